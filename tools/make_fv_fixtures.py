#!/usr/bin/env python3
"""Independent Python reference for function vectors (stages/fv.h, docs/function_vectors.md).

Needs the fixture venv of tools/make_venv.sh (torch 2.4.1 CPU, transformers 4.44.2, safetensors 0.4.5):

    /work/venv/bin/python tools/make_fv_fixtures.py

For every model M of tests/fixtures/models/{gemma2,llama3,smollm,phi2}-tiny and the ICL prompts of
tests/fixtures/patch/M.safetensors (tokens, example index), computed from the unmodified HF modules with
hooks only:
  - head means: a forward pre-hook on each layer's o_proj (Phi: dense) records its input z; head h's output
    at the last position is z[-1, h*d:(h+1)*d] @ W_o[:, h*d:(h+1)*d]^T (no bias), averaged over the prompts
    in float64;
  - the function vector: the chosen heads' means summed;
  - injection: each prompt's zero-shot form (the positions of example index -1 and of the query's example)
    run with a forward hook on decoder layer L adding scale * vector to its output hidden state at the last
    prompt position; the logits there, and greedy tokens by full recomputation (no cache) of every step with
    the same addition at that position (what a cached decode reading the injected pass's keys computes).
Writes (replacing) tests/fixtures/fv/fv.safetensors:
    M.heads                int32 [n, 2]           (layer, head)
    M.head_means           float32 [n, hidden]
    M.vector               float32 [hidden]
    M.layers / M.scales    int32 [2] / float32 [2]
    M.prompt<i>.zero_shot  int32 [n_i]            the zero-shot tokens
    M.prompt<i>.l<a>.s<b>.logits     float32 [vocab]  at the last position, layer layers[a], scale scales[b]
    M.prompt<i>.l<a>.s<b>.generated  int32 [N_GEN]    greedy tokens (-1 after a stop id)
    M.prompt<i>.baseline.logits      float32 [vocab]  no vector
Deterministic: running it twice gives byte-identical files.
"""
import json
import os
import sys

import numpy as np
import torch
import safetensors
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

assert torch.__version__.split("+")[0] == "2.4.1", torch.__version__
assert transformers.__version__ == "4.44.2", transformers.__version__
assert safetensors.__version__ == "0.4.5", safetensors.__version__

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_models import save_safetensors_stable  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, "tests", "fixtures", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "fv")
MODELS = ["gemma2-tiny", "llama3-tiny", "smollm-tiny", "phi2-tiny"]
N_PROMPTS = 3
N_GEN = 5
SCALES = [1.0, 3.0]

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)


def heads_of(L, H):
    hs = []
    for h in [(0, 1), (L - 1, 0), (L // 2, H - 1)]:
        if h not in hs:
            hs.append(h)
    return hs


def o_proj(layer):
    a = layer.self_attn
    return a.dense if hasattr(a, "dense") else a.o_proj


@torch.no_grad()
def head_means(model, prompts, heads):
    c = model.config
    hd = c.hidden_size // c.num_attention_heads if not hasattr(c, "head_dim") else c.head_dim
    rec = {}
    hooks = [o_proj(layer).register_forward_pre_hook(lambda mod, args, l=l: rec.__setitem__(l, args[0][0].detach().clone()))
             for l, layer in enumerate(model.model.layers)]
    sums = [torch.zeros(c.hidden_size, dtype=torch.float64) for _ in heads]
    try:
        for toks in prompts:
            with torch.no_grad():
                model(input_ids=torch.tensor([toks]), use_cache=False)
            for k, (l, h) in enumerate(heads):
                z = rec[l][-1, h * hd:(h + 1) * hd]
                w = o_proj(model.model.layers[l]).weight[:, h * hd:(h + 1) * hd]
                sums[k] += (z @ w.T).double()
    finally:
        for x in hooks:
            x.remove()
    return torch.stack([s / len(prompts) for s in sums]).float().detach()


def injected_logits(model, toks, layer, vec, scale):
    """Logits at every position of toks with scale * vec added to decoder layer `layer`'s output at the
    position len(prompt) - 1 (set in INJECT_AT)."""
    def hook(mod, args, out):
        hs = out[0] if isinstance(out, tuple) else out
        hs = hs.clone()
        hs[0, INJECT_AT[0], :] += scale * vec
        return (hs,) + tuple(out[1:]) if isinstance(out, tuple) else hs
    h = model.model.layers[layer].register_forward_hook(hook) if layer is not None else None
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([toks]), use_cache=False).logits[0].float().clone()
    finally:
        if h:
            h.remove()


INJECT_AT = [0]


def greedy(model, toks, layer, vec, scale, stop):
    INJECT_AT[0] = len(toks) - 1
    cur, gen = list(toks), []
    first = None
    for _ in range(N_GEN):
        last = injected_logits(model, cur, layer, vec, scale)[-1]
        if first is None:
            first = last
        t = int(torch.argmax(last))
        gen.append(t)
        cur.append(t)
        if t in stop:
            break
    return first, gen + [-1] * (N_GEN - len(gen))


def main():
    os.makedirs(OUT, exist_ok=True)
    tensors = {}
    lines = []
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(MODELS_DIR, name), torch_dtype=torch.float32,
                                                     attn_implementation="eager")
        model.eval()
        c = model.config
        L, H = c.num_hidden_layers, c.num_attention_heads
        eos = c.eos_token_id
        stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        fx = safe_open(os.path.join(ROOT, "tests", "fixtures", "patch", name + ".safetensors"), "pt")
        prompts, zero = [], []
        for i in range(N_PROMPTS):
            toks = fx.get_tensor(f"prompt{i}.tokens").tolist()
            idx = fx.get_tensor(f"prompt{i}.index").tolist()
            prompts.append(toks)
            zero.append([t for t, x in zip(toks, idx) if x == -1 or x == idx[-1]])
        heads = heads_of(L, H)
        means = head_means(model, prompts, heads)
        vec = means.double().sum(0).float()
        layers = [0, L - 1]
        tensors[f"{name}.heads"] = torch.tensor(heads, dtype=torch.int32)
        tensors[f"{name}.head_means"] = means.contiguous()
        tensors[f"{name}.vector"] = vec.contiguous()
        tensors[f"{name}.layers"] = torch.tensor(layers, dtype=torch.int32)
        tensors[f"{name}.scales"] = torch.tensor(SCALES, dtype=torch.float32)
        for i, z in enumerate(zero):
            tensors[f"{name}.prompt{i}.zero_shot"] = torch.tensor(z, dtype=torch.int32)
            base, _ = greedy(model, z, None, vec, 0.0, stop)
            tensors[f"{name}.prompt{i}.baseline.logits"] = base.contiguous()
            for a, l in enumerate(layers):
                for b, s in enumerate(SCALES):
                    lg, gen = greedy(model, z, l, vec, s, stop)
                    tensors[f"{name}.prompt{i}.l{a}.s{b}.logits"] = lg.contiguous()
                    tensors[f"{name}.prompt{i}.l{a}.s{b}.generated"] = torch.tensor(gen, dtype=torch.int32)
                    lines.append(f"{name} prompt {i} layer {l} scale {s}: max |logit change| "
                                 f"{float((lg - base).abs().max()):.4f}, generated {gen}")
        # self-check: the hook at scale 0 changes nothing
        z0 = zero[0]
        INJECT_AT[0] = len(z0) - 1
        d0 = float((injected_logits(model, z0, 0, vec, 0.0)[-1] - tensors[f"{name}.prompt0.baseline.logits"]).abs().max())
        assert d0 == 0.0, d0
        lines.append(f"{name}: heads {heads}, |vector| {float(vec.norm()):.4f}")
    save_safetensors_stable(tensors, os.path.join(OUT, "fv.safetensors"),
                            {"n_prompts": str(N_PROMPTS), "n_gen": str(N_GEN), "models": json.dumps(MODELS)})
    with open(os.path.join(OUT, "checks.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
