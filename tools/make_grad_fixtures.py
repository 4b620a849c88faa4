#!/usr/bin/env python3
"""Independent Python reference for the activation gradients of the attribution loss (pipeline/backward.h).

Needs the fixture venv made by tools/make_venv.sh (torch 2.4.1 CPU, transformers 4.44.2,
tokenizers 0.19.1, safetensors 0.4.5, numpy<2); the versions are asserted below:

    tools/make_venv.sh .venv
    .venv/bin/python tools/make_grad_fixtures.py

Reads tests/fixtures/models/{gemma2,llama3,smollm,phi2}-tiny and datasets/pairs/, writes (replacing):
    tests/fixtures/grad/<model>.safetensors
    tests/fixtures/grad/checks.txt
See tests/fixtures/grad/README.md for the layout and the conventions.

Method: the HF model (eager attention, fp32) runs with its attention modules' forward replaced by a
patched copy of the 4.44.2 eager code in which k*(h, B, A) and v*(h, B, A) are materialised per edge
by an explicit gather (current pass or donor 0) and kept with retain_grad(), and the per-head attention
output that enters o_proj / dense (after head-unit substitution) is kept with retain_grad() too. The
loss is computed from HF's own logits; torch autograd gives dL/dz, dL/dk*, dL/dv*. The unit scores are
then evaluated by their defining formulas from those per-edge gradients (deliberately naive; the C side
never materialises per-edge K/V). Deterministic: running it twice gives byte-identical files.
"""
import json
import math
import os
import sys
import types as pytypes

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_patch_fixtures as mp  # noqa: E402  (asserts the pinned versions; prompts, donors, plans, writer)
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

assert torch.__version__.split("+")[0] == "2.4.1", torch.__version__
assert transformers.__version__ == "4.44.2", transformers.__version__

OUT = os.path.join(mp.ROOT, "tests", "fixtures", "grad")
N_PROMPTS = 2
TARGET = 7
mp.TYPE_CODES["target"] = TARGET  # plans below name the target type

# The patched plan: y -> last and y -> target edges read donor 0 everywhere; one head unit substituted.
PLAN = {"name": "y_to_last_target_and_head",
        "rules": [mp.rule(["y"], ["last", "target"], "any")],
        "heads": [mp.hunit(1, 0, "last", 0)]}
# Units whose attribution scores are stored (donor 0), for the clean pass and the patched pass.
HEAD_UNITS = [(0, 0, "last"), (1, 1, "y"), (1, 0, "last"), (0, 3, "x"), ("L-1", 2, "target"), (1, 2, "query")]
EDGE_UNITS = [(0, 0, "y", "last"), (1, 2, "t", "last"), (0, 1, "x", "y"), ("L-1", 3, "query", "target"),
              ("L-1", 1, "y", "target"), (1, 3, "x", "last"), ("L-1", 2, "target", "target"),
              (1, 0, "x", "last")]  # the last one: into a substituted head in the plan (scores 0 there)


class GState:
    def __init__(self):
        self.em = None   # per layer [H, T, T] donor index or -1
        self.hu = None   # per layer [(h, mask, d)]
        self.dk = self.dv = self.dz = None  # donor 0 only: per layer [G, T, hd] / [H, T, hd]
        self.rec = {}    # per layer: k, v (current, post-RoPE), z (post-substitution, retain_grad), kstar, vstar, allowed


GS = GState()


def grad_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                 output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
    arch = mp.arch_of(self)
    mod = sys.modules[type(self).__module__]
    l = self.layer_idx
    H, G, hd = self.num_heads, self.num_key_value_heads, self.head_dim
    rep = H // G
    bsz, T, _ = hidden_states.size()
    assert bsz == 1 and past_key_value is None
    q = self.q_proj(hidden_states).view(1, T, H, hd).transpose(1, 2)
    k = self.k_proj(hidden_states).view(1, T, G, hd).transpose(1, 2)
    v = self.v_proj(hidden_states).view(1, T, G, hd).transpose(1, 2)
    if arch == "gemma2":
        cos, sin = self.rotary_emb(v, position_ids)
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    elif arch == "llama":
        cos, sin = position_embeddings if position_embeddings is not None else self.rotary_emb(v, position_ids)
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    else:
        cos, sin = self.rotary_emb(v, seq_len=T)
        rd = self.rotary_emb.dim
        q_rot, k_rot = mod.apply_rotary_pos_emb(q[..., :rd], k[..., :rd], cos, sin, position_ids)
        q = torch.cat((q_rot, q[..., rd:]), dim=-1)
        k = torch.cat((k_rot, k[..., rd:]), dim=-1)
    q, k, v = q[0], k[0], v[0]
    if GS.em is not None:
        sel = GS.em[l] + 1
        opts_k = torch.stack([k, GS.dk[l]])
        opts_v = torch.stack([v, GS.dv[l]])
        assert int(sel.max()) <= 1
    else:
        sel = torch.zeros((H, T, T), dtype=torch.long)
        opts_k, opts_v = k[None], v[None]
    g = (torch.arange(H) // rep)[:, None, None]
    a = torch.arange(T)[None, None, :]
    kstar = opts_k[sel, g, a]  # [H, T(B), T(A), hd]
    vstar = opts_v[sel, g, a]
    if torch.is_grad_enabled():
        kstar.retain_grad()
        vstar.retain_grad()
    if arch == "phi":
        s = (q.to(torch.float32)[:, :, None, :] * kstar.to(torch.float32)).sum(-1) / math.sqrt(hd)
    else:
        s = (q[:, :, None, :] * kstar).sum(-1)
        if arch == "gemma2":
            s = s * self.scaling
            cap = self.config.attn_logit_softcapping
            if cap is not None:
                s = torch.tanh(s / cap) * cap
        else:
            s = s / math.sqrt(hd)
    qpos, kpos = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = kpos <= qpos
    if arch == "gemma2" and self.sliding_window is not None:
        allowed &= (qpos - kpos) < self.sliding_window
    min_dtype = torch.finfo(s.dtype).min
    if attention_mask is not None:
        hm = attention_mask[0, 0, :, :T]
        assert torch.equal(hm == 0, allowed)
    s = s + torch.where(allowed, torch.zeros((), dtype=s.dtype), torch.full((), min_dtype, dtype=s.dtype))
    p = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
    z = (p[..., None] * vstar).sum(2)  # [H, T, hd]
    if GS.hu is not None and GS.hu[l]:
        z = z.clone()
        done = torch.zeros((H, T), dtype=torch.bool)
        for h, pm, d in GS.hu[l]:
            assert d == 0
            m = pm & ~done[h]
            z[h, m] = GS.dz[l][h, m]
            done[h] |= pm
    zin = z.transpose(0, 1).reshape(1, T, H * hd)
    if torch.is_grad_enabled():
        zin.retain_grad()
    GS.rec[l] = {"k": k, "v": v, "zin": zin, "kstar": kstar, "vstar": vstar, "allowed": allowed, "p": p}
    out = self.dense(zin) if arch == "phi" else self.o_proj(zin)
    return out, None, past_key_value


def install(model):
    for layer in model.model.layers:
        layer.self_attn.forward = pytypes.MethodType(grad_forward, layer.self_attn)


def run(model, tokens, grad, em=None, hu=None, donor=None):
    GS.em, GS.hu, GS.rec = em, hu, {}
    if donor is not None:
        GS.dk, GS.dv, GS.dz = donor["k"], donor["v"], donor["z"]
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=torch.tensor([tokens]), position_ids=torch.arange(len(tokens))[None],
                       use_cache=False).logits[0]
    rec, GS.rec = GS.rec, {}
    return logits, rec


def donor_record(model, tokens, L, H, hd):
    _, rec = run(model, tokens, False)
    return {"k": [rec[l]["k"].detach() for l in range(L)], "v": [rec[l]["v"].detach() for l in range(L)],
            "z": [rec[l]["zin"].detach()[0].view(-1, H, hd).transpose(0, 1).contiguous() for l in range(L)]}


def resolve(units, L):
    return [tuple(L - 1 if x == "L-1" else x for x in u) for u in units]


def main():
    os.makedirs(OUT, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f"transformers {transformers.__version__} torch {torch.__version__} tokenizers {tokenizers.__version__} "
        f"safetensors {safetensors.__version__}")
    pairs = mp.prompt_pairs([AutoTokenizer.from_pretrained(os.path.join(mp.MODELS_DIR, n)) for n in mp.MODELS])
    pairs = pairs[:N_PROMPTS]
    for mi, name in enumerate(mp.MODELS):
        folder = os.path.join(mp.MODELS_DIR, name)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()
        for prm in model.parameters():
            prm.requires_grad_(False)  # gradients w.r.t. activations only
        # ... which start at the embeddings: the graph begins there (the gradient stops there too)
        model.model.embed_tokens.register_forward_hook(
            lambda mod, inp, out: out.requires_grad_(True) if torch.is_grad_enabled() else out)
        tok = AutoTokenizer.from_pretrained(folder)
        c = model.config
        L, H, V = c.num_hidden_layers, c.num_attention_heads, c.vocab_size
        hd = c.hidden_size // H if not hasattr(c, "head_dim") else c.head_dim
        install(model)
        hunits, eunits = resolve(HEAD_UNITS, L), resolve(EDGE_UNITS, L)
        tensors = {"head_units": torch.tensor([[l, h, mp.TYPE_CODES[t]] for l, h, t in hunits], dtype=torch.int32),
                   "edge_units": torch.tensor([[l, h, mp.TYPE_CODES[a], mp.TYPE_CODES[b]] for l, h, a, b in eunits],
                                              dtype=torch.int32)}
        prompts = []
        for pi, pp in enumerate(pairs):
            toks, typ, idx = mp.build_prompt(tok, pp)
            P = len(toks)
            tgt = tok(" " + pp[-1][1], add_special_tokens=False)["input_ids"]
            toks, typ, idx = toks + tgt, typ + [TARGET] * len(tgt), idx + [mp.N_DEMOS] * len(tgt)
            donors = mp.make_donors(tok, V, toks, typ, seed=1000 * mi + 10 * pi + 7)
            tensors[f"prompt{pi}.tokens"] = torch.tensor(toks, dtype=torch.int32)
            tensors[f"prompt{pi}.types"] = torch.tensor(typ, dtype=torch.int32)
            tensors[f"prompt{pi}.index"] = torch.tensor(idx, dtype=torch.int32)
            tensors[f"prompt{pi}.donors"] = torch.tensor(donors[:1], dtype=torch.int32)
            tensors[f"prompt{pi}.n_target"] = torch.tensor([len(tgt)], dtype=torch.int32)
            prompts.append((toks, typ, idx, P, len(tgt), donor_record(model, donors[0], L, H, hd)))
            log(f"{name} prompt{pi}: {len(toks)} tokens ({P} prompt + {len(tgt)} target)")

        for case in ("clean", "plan"):
            losses, head_pp, edge_pp = [], [], []
            for pi, (toks, typ, idx, P, n_t, donor) in enumerate(prompts):
                T = len(toks)
                if case == "plan":
                    em = mp.compile_edges(PLAN, typ, idx, L, H)
                    hu = mp.compile_heads(PLAN, typ, L, H)
                    logits, rec = run(model, toks, True, em, hu, donor)
                else:
                    logits, rec = run(model, toks, True, None, None, donor)
                loss = torch.nn.functional.cross_entropy(logits[P - 1:T - 1].float(),
                                                         torch.tensor(toks[P:T]), reduction="mean")
                (loss / len(prompts)).backward()
                losses.append(float(loss))
                dz = torch.stack([rec[l]["zin"].grad[0] for l in range(L)])  # [L, T, H*hd]
                tensors[f"{case}.prompt{pi}.dz"] = dz.contiguous()
                tensors[f"{case}.prompt{pi}.loss"] = torch.tensor([float(loss)], dtype=torch.float32)
                typ_t = torch.tensor(typ)
                hs = []
                for l, h, t in hunits:
                    zc = rec[l]["zin"].detach()[0].view(T, H, hd)[:, h]
                    zd = donor["z"][l][h]
                    g = rec[l]["zin"].grad[0].view(T, H, hd)[:, h]
                    m = typ_t == mp.TYPE_CODES[t]
                    hs.append(float(((zc - zd) * g)[m].sum()))
                head_pp.append(hs)
                es = []
                for l, h, a, b in eunits:
                    r = rec[l]
                    gk = (H // (r["k"].shape[0]))
                    gi = h // gk
                    ks, vs = r["kstar"].detach()[h], r["vstar"].detach()[h]  # [B, A, hd]
                    dks, dvs = r["kstar"].grad[h], r["vstar"].grad[h]
                    kd, vd = donor["k"][l][gi][None], donor["v"][l][gi][None]  # [1, A, hd]
                    m = (typ_t[:, None] == mp.TYPE_CODES[b]) & (typ_t[None, :] == mp.TYPE_CODES[a]) & r["allowed"]
                    term = (dks * (kd - ks)).sum(-1) + (dvs * (vd - vs)).sum(-1)
                    es.append(float(term[m].sum()))
                edge_pp.append(es)
                if case == "clean":
                    # the patched module with an empty plan equals the unmodified HF forward
                    for layer in model.model.layers:
                        layer.self_attn.forward = layer.self_attn.__class__.forward.__get__(layer.self_attn)
                    with torch.no_grad():
                        hf = model(input_ids=torch.tensor([toks]), use_cache=False).logits[0]
                    install(model)
                    d = float((hf - logits.detach()).abs().max())
                    assert d < 1e-5, d
                    log(f"  CHECK {name} prompt{pi}: patched forward with an empty plan vs HF logits {d:.3g}")
            hp = torch.tensor(head_pp, dtype=torch.float32)
            ep = torch.tensor(edge_pp, dtype=torch.float32)
            tensors[f"{case}.loss"] = torch.tensor([sum(losses) / len(losses)], dtype=torch.float32)
            tensors[f"{case}.head_scores"] = hp.abs().mean(0)
            tensors[f"{case}.edge_scores"] = ep.abs().mean(0)
            tensors[f"{case}.head_signed"] = hp.contiguous()  # [prompt, unit] before the absolute value
            tensors[f"{case}.edge_signed"] = ep.contiguous()
            log(f"  {name} {case}: loss {sum(losses) / len(losses):.6f} (per prompt {losses})")
            log(f"    head scores {[round(x, 6) for x in tensors[f'{case}.head_scores'].tolist()]}")
            log(f"    edge scores {[round(x, 6) for x in tensors[f'{case}.edge_scores'].tolist()]}")
        d = float((tensors["plan.prompt0.dz"] - tensors["clean.prompt0.dz"]).abs().max())
        assert d > 1e-4, "the plan changes the gradients"
        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
                "model": name, "plan": json.dumps(PLAN), "n_prompts": str(len(prompts))}
        mp.save_safetensors_stable(tensors, os.path.join(OUT, name + ".safetensors"), meta)
    with open(os.path.join(OUT, "checks.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    log("all checks passed")


if __name__ == "__main__":
    main()
