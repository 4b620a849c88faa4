"""The GPU half of tools/device_check.sh: edgepatch's CUDA forward and patched forward against HuggingFace
transformers on the same GPU, with random-weight models of real shapes made on the spot, and timed
against HF eager with patched attention (the original code's approach: it replaced the attention
forward of transformers 4.44's eager modules). Prints one table; exit status 1 if a check fails.

For each shape (a config.json: bench/gemma2-2b.json, bench/smollm2-135m.json, or any HF config):
  1. A model with HF's random init (seeded) whose weights are rounded to bf16 values, saved (fp32
     safetensors), so that fp32 and bf16 runs on both sides use exactly the same weights; HF's bf16 model
     is that folder loaded with torch_dtype=bfloat16, as users load it.
  2. B prompts of T tokens, typed and with donor 0, exactly as bench/bench_patch.c builds them; the
     plan is every y -> last edge in every layer and head, read from donor 0.
  3. Ours (bench_patch): clean pass and donor + patched pass, last-position logits, on cuda in bf16
     (the whole batch, timed), and in fp32 on cuda and on cpu for the first `--small` prompts.
  4. HF: the same in bf16 (whole batch, timed) and in fp32 (first prompts), TF32 off.
Checks: fp32 cuda vs HF fp32 and vs our cpu within 1e-4 (row-relative, as the C tests); bf16: our bf16
run's distance to HF fp32 at most 1.5x HF bf16's own distance to HF fp32 (+1e-3) -- the bf16 tolerance
calibrated by HF itself -- and its distance to HF bf16 reported. Timing: tokens/s of donor + patched
passes, ours vs HF, and the achieved TFLOP/s of the matrix products of our patched run against --peak.

Attribution (unless --no-attrib): the same prompts, each followed by --targets K target tokens (bench_id
continued), the same plan; one round = donor pass, patched forward + backward, every head unit's score
(layer, head, each of the 7 prompt types, donor 0).
  Ours: bench_backward --model (on the backend, fp32 over the whole batch with 1 timed rep; bf16 with
  --reps), scores dumped as float64.
  HF: torch autograd through HF eager with the patched attention above (the original's way): the donor
  pass under no_grad, the patched pass with forward pre-hooks on every o_proj keeping z, loss = per prompt
  the mean target cross-entropy after the final softcap, summed over prompts (docs/attribution.md),
  torch.autograd.grad to every z, score = |sum over a type's positions of (z - z_donor)_h . dL/dz_h|, mean
  over prompts (float64 sums).
Checks: fp32 scores ours vs HF within 1e-3 of the largest (the forward's 1e-4 times 10: the scores carry
the forward's and the backward's rounding through every layer; a wrong term moves them by percent), fp32
loss within 1e-4 relative; bf16 vs fp32 Spearman over all units >= min(0.99, HF's own bf16-vs-fp32
Spearman - 0.01). Reported: the round's seconds ours vs HF (bf16, target ratio >= 5; fp32 too) and the
memory: ours as backward_bytes' peak + the donor caches (weights excluded) and the GPU's used memory
during our run by nvidia-smi minus before it (weights, CUDA context and pool included); HF's as
torch.cuda.max_memory_allocated during the round minus what was allocated before it (its weights
excluded).

    python tools/device_check.py --bin .device [--shapes bench/gemma2-2b.json,bench/smollm2-135m.json]
                                 [--batch 64] [--len 100] [--reps 3] [--small 2] [--device cuda]
                                 [--targets 2] [--no-attrib]
Dry run without a GPU: --device cpu (our side on the cpu backend; `--bin build/bench`), small sizes.

Needs torch and transformers 4.44.x (tools/device_check.sh puts the carried wheels on the path).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import types as pytypes

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

TT_BOS, TT_X, TT_T, TT_Y, TT_N, TT_LAST = 0, 1, 2, 3, 4, 6


def bench_id(s, t, T, vocab):
    x = ((s * T + t) * 2654435761) % (1 << 32)
    return 1 + x % (vocab - 1)


def prompts(B, T, V):
    """ids, donor ids, types: as bench_patch.c."""
    ids = np.zeros((B, T), np.int64)
    don = np.zeros((B, T), np.int64)
    typ = np.zeros(T, np.int64)
    for t in range(T):
        k = (t - 1) % 4
        typ[t] = TT_BOS if t == 0 else TT_LAST if t == T - 1 else (TT_X, TT_T, TT_Y, TT_N)[k]
    for s in range(B):
        for t in range(T):
            ids[s, t] = bench_id(s, t, T, V)
            don[s, t] = 1 + (ids[s, t] + 7919) % (V - 1) if typ[t] in (TT_X, TT_Y) else ids[s, t]
    return ids, don, typ


# ---------------------------------------------------------------------------------------------------
# HF eager attention with edge patching (transformers 4.44 Gemma2Attention / LlamaAttention signatures)
# ---------------------------------------------------------------------------------------------------
class Patch:
    mode = "off"   # off | record (donor pass: keep post-RoPE k, v) | patch (edges in mask read donor k, v)
    mask = None    # [T, T] bool: receiver row reads the donor's key/value at sender column
    k, v = {}, {}


def patched_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                    output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None,
                    **kwargs):
    if Patch.mode == "off":
        kw = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_value=past_key_value,
                  output_attentions=output_attentions, use_cache=use_cache, cache_position=cache_position)
        if position_embeddings is not None:
            kw["position_embeddings"] = position_embeddings
        return self._orig_forward(hidden_states, **kw, **kwargs)
    mod = sys.modules[type(self).__module__]
    gemma = type(self).__name__ == "Gemma2Attention"
    bsz, q_len, _ = hidden_states.size()
    H, G, hd = self.num_heads, self.num_key_value_heads, self.head_dim
    q = self.q_proj(hidden_states).view(bsz, q_len, H, hd).transpose(1, 2)
    k = self.k_proj(hidden_states).view(bsz, q_len, G, hd).transpose(1, 2)
    v = self.v_proj(hidden_states).view(bsz, q_len, G, hd).transpose(1, 2)
    if position_embeddings is not None:
        cos, sin = position_embeddings
    else:
        cos, sin = self.rotary_emb(v, position_ids)
    q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    k = mod.repeat_kv(k, H // G)
    v = mod.repeat_kv(v, H // G)
    layer = self.layer_idx

    def scores(keys):
        s = torch.matmul(q, keys.transpose(2, 3))
        if gemma:
            s = s * self.scaling
            cap = self.config.attn_logit_softcapping
            if cap is not None:
                s = torch.tanh(s / cap) * cap
        else:
            s = s / math.sqrt(hd)
        return s + attention_mask[:, :, :, : keys.shape[-2]]

    if Patch.mode == "record":
        Patch.k[layer], Patch.v[layer] = k, v
        s = scores(k)
        p = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(p, v)
    else:
        m = Patch.mask[None, None]
        s = torch.where(m, scores(Patch.k[layer]), scores(k))
        p = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        out = torch.matmul(torch.where(m, zero, p), v) + torch.matmul(torch.where(m, p, zero), Patch.v[layer])
    out = out.transpose(1, 2).reshape(bsz, q_len, H * hd)
    return self.o_proj(out), None, past_key_value


def install(model):
    for layer in model.model.layers:
        a = layer.self_attn
        a._orig_forward = a.forward
        a.forward = pytypes.MethodType(patched_forward, a)


def hf_last_logits(model, ids):
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, -1, :]
    logits = model.lm_head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def hf_runs(model, ids, don, mask, reps, device):
    """Clean and donor + patched last-position logits; mean seconds of the patched run over reps after a
    warm-up (-1 when reps is 0)."""
    Patch.mask = mask
    secs = []
    with torch.inference_mode():
        clean = hf_last_logits(model, ids)
        for rep in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            Patch.mode = "record"
            hf_last_logits(model, don)
            Patch.mode = "patch"
            patched = hf_last_logits(model, ids)
            Patch.mode = "off"
            sync(device)
            secs.append(time.perf_counter() - t0)
    Patch.k, Patch.v = {}, {}
    return clean.cpu(), patched.cpu(), (sum(secs[1:]) / reps if reps else -1)


def hf_attribution(model, ids, don, mask, typ, T, K, reps, device):
    """One attribution round by torch autograd through HF eager with hook-based patching (the original's
    way): the donor pass (no grad; Patch records its post-RoPE k, v and a hook its o_proj inputs z_d),
    the patched pass (edges in Patch.mask read the donor's k, v; a hook keeps each layer's o_proj input
    z), loss = per prompt the mean cross-entropy of its K targets (after the final softcap), summed over
    prompts (docs/attribution.md), autograd to every z, then head-unit scores |sum over the positions of
    a type of (z - z_d)_h . dL/dz_h|, mean over prompts: [L, H, 7] float64. ids, don: [B, T + K] (targets
    appended to both); mask: [T + K, T + K] the edges patched; typ: [T] the prompt's types. Returns scores, loss, mean seconds of reps after a
    warm-up (-1 when reps is 0), and the peak bytes allocated during the round beyond what was allocated
    before it (cuda; -1 otherwise)."""
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    B = ids.shape[0]
    z = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        (lambda l: lambda mod, args: z.__setitem__(l, args[0]))(l)) for l, layer in enumerate(model.model.layers)]
    onehot = torch.zeros(T, 7, dtype=torch.float64, device=ids.device)
    onehot[torch.arange(T, device=ids.device), typ] = 1.0
    cap = getattr(cfg, "final_logit_softcapping", None)
    secs, base, peak = [], -1, -1
    Patch.mask = mask
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for rep in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            Patch.mode = "record"
            model.model(input_ids=don, use_cache=False)
            zd = {l: z[l].detach() for l in range(L)}
        Patch.mode = "patch"
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, T - 1:T + K - 1]
        Patch.mode = "off"
        logits = model.lm_head(hidden).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        ce = torch.nn.functional.cross_entropy(logits.reshape(B * K, -1), ids[:, T:T + K].reshape(-1),
                                               reduction="none").view(B, K).mean(1)
        loss = ce.sum()
        zs = [z[l] for l in range(L)]
        grads = torch.autograd.grad(loss, zs)
        score = torch.empty(L, H, 7, dtype=torch.float64, device=ids.device)
        with torch.no_grad():
            for l in range(L):
                diff = (zs[l][:, :T] - zd[l][:, :T]).double().view(B, T, H, hd)
                g = grads[l][:, :T].double().view(B, T, H, hd)
                per = (diff * g).sum(-1)  # [B, T, H]
                score[l] = torch.einsum("bth,ty->bhy", per, onehot).abs().mean(0)
        sync(device)
        secs.append(time.perf_counter() - t0)
        lv = float(loss)
        del hidden, logits, ce, loss, zs, grads, zd
        z.clear()
    Patch.k, Patch.v = {}, {}
    for h in hooks:
        h.remove()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    return score.cpu(), lv, (sum(secs[1:]) / reps if reps else -1), peak


class GpuMemory:
    """The GPU's used memory (nvidia-smi, every 0.1 s) while a command runs, minus what was used just before:
    the device memory our binary took (weights, buffers, the CUDA context and the allocator's pool)."""

    def __init__(self, device):
        self.on = device == "cuda" and shutil.which("nvidia-smi") is not None
        self.peak, self.base, self._stop = -1, -1, None

    @staticmethod
    def used():
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True)
        return int(r.stdout.strip().splitlines()[0]) * (1 << 20) if r.returncode == 0 and r.stdout.strip() else -1

    def __enter__(self):
        if self.on:
            import threading
            self.base = self.used()
            self._stop = threading.Event()

            def poll():
                while not self._stop.wait(0.1):
                    self.peak = max(self.peak, self.used())
            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.on:
            self._stop.set()
            self._thread.join()
            if self.peak >= 0 and self.base >= 0:
                self.peak -= self.base


def spearman(a, b):
    """Spearman rank correlation with average ranks for ties (units of a type with no position score 0)."""
    def ranks(x):
        x = np.asarray(x, np.float64).ravel()
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                j += 1
            r[order[i:j + 1]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def ours_attribution(bin_dir, model_dir, backend, dtype, B, T, K, reps, dump, device):
    """bench_backward --model: our attribution round (donor pass, patched forward + backward, head scores).
    Returns scores [L*H*7] float64, loss, the key=value line, the GPU's used memory during the run."""
    cmd = [os.path.join(bin_dir, "bench_backward"), "--model", model_dir, "--backend", backend, "--dtype", dtype,
           "--batch", str(B), "--len", str(T), "--targets", str(K), "--reps", str(reps), "--dump", dump]
    env = dict(os.environ)
    if os.environ.get("EP_DEVICE_LIBS"):
        env["LD_LIBRARY_PATH"] = os.environ["EP_DEVICE_LIBS"] + ":" + env.get("LD_LIBRARY_PATH", "")
    with GpuMemory(device if backend == "cuda" else "cpu") as mem:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    kv = dict(x.split("=", 1) for x in r.stdout.strip().splitlines()[-1].split())
    raw = np.fromfile(dump, dtype="<f8")
    return raw[:-1].copy(), float(raw[-1]), kv, mem.peak


def gib(x):
    return f"{x / (1 << 30):.2f} GiB" if x >= 0 else "-"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
def row_error(a, b):
    """Worst over rows of max |a - b| / max |b| (the C tests' row-relative error)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs().amax(dim=1) / b.abs().amax(dim=1).clamp_min(1e-6)).max())


def ours(bin_dir, model_dir, backend, dtype, B, T, reps, dump):
    cmd = [os.path.join(bin_dir, "bench_patch"), "--model", model_dir, "--backend", backend, "--dtype", dtype,
           "--batch", str(B), "--len", str(T), "--reps", str(reps), "--dump", dump]
    env = dict(os.environ)
    if os.environ.get("EP_DEVICE_LIBS"):  # the libraries tools/device_check.sh carried, for our binaries only
        env["LD_LIBRARY_PATH"] = os.environ["EP_DEVICE_LIBS"] + ":" + env.get("LD_LIBRARY_PATH", "")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    kv = dict(x.split("=", 1) for x in r.stdout.strip().splitlines()[-1].split())
    raw = np.fromfile(dump, dtype="<f4")
    both = torch.from_numpy(raw.reshape(2, B, -1).copy())
    return both[0], both[1], float(kv["patched_s"])


def matrix_flops(cfg, B, T):
    """Flops of the matrix products of one donor + patched run: two passes over B*T tokens through every
    layer's projections, attention (scores and values, doubled in the patched pass is not counted: the
    kernel reads either key) and the vocabulary projection at B last positions per pass."""
    D, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or D // cfg.num_attention_heads
    Q, KV = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_token = 2 * (D * Q + 2 * D * KV + Q * D + 3 * D * I)
    attn = 2 * 2 * cfg.num_attention_heads * hd * (T * (T + 1) / 2) * B
    return 2 * (B * T * per_token * L + attn * L + 2 * B * D * V)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="folder with bench_patch and bench_backward")
    ap.add_argument("--shapes", default="bench/gemma2-2b.json,bench/smollm2-135m.json")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--len", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small", type=int, default=2)
    ap.add_argument("--targets", type=int, default=2, help="target tokens after each prompt (attribution)")
    ap.add_argument("--no-attrib", action="store_true", help="skip the attribution round")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak", type=float, default=989.0, help="the GPU's dense bf16 peak, TFLOP/s (H100/H200 SXM)")
    ap.add_argument("--work", default="/tmp/edgepatch-device-check")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = a.device
    backend = "cuda" if dev == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else ""), flush=True)
    rows, failed = [], False

    def row(shape, check, value, limit, ok, note=""):
        nonlocal failed
        failed |= not ok
        rows.append((shape, check, value, limit, "pass" if ok else "FAIL", note))
        print(f"  {shape:14s} {check:44s} {value:>12s} {limit:>10s} {'pass' if ok else 'FAIL'} {note}", flush=True)

    for shape_path in a.shapes.split(","):
        shape = os.path.splitext(os.path.basename(shape_path))[0]
        if shape == "config":
            shape = os.path.basename(os.path.dirname(shape_path))
        t_shape = time.time()
        with open(shape_path) as f:
            cfg = AutoConfig.for_model(**json.load(f))
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
        folder = os.path.join(a.work, shape)
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, safe_serialization=True)  # fp32 weights with bf16 values
        V, B, T, S = cfg.vocab_size, a.batch, a.len, min(a.small, a.batch)
        ids, don, typ = prompts(B, T, V)
        ids_t, don_t = torch.from_numpy(ids).to(dev), torch.from_numpy(don).to(dev)
        typ_t = torch.from_numpy(typ).to(dev)
        mask = (typ_t[None, :] == TT_Y) & (typ_t[:, None] == TT_LAST)  # [receiver, sender]
        # The attribution round's sequences: each prompt and its donor followed by K target tokens
        # (bench_id continued, untyped: never patched), as bench_backward --model builds them.
        K = a.targets
        tgt = torch.tensor([[bench_id(s_, t, T, V) for t in range(T, T + K)] for s_ in range(B)], device=dev)
        ids_a, don_a = torch.cat([ids_t, tgt], 1), torch.cat([don_t, tgt], 1)
        mask_a = torch.zeros(T + K, T + K, dtype=torch.bool, device=dev)
        mask_a[:T, :T] = mask
        attrib = not a.no_attrib
        print(f"{shape}: model made and saved in {time.time() - t_shape:.1f} s", flush=True)

        # HF fp32 on the first prompts; then HF bf16 as users load it (whole batch, timed).
        install(model)
        hf32_clean, hf32_patched, _ = hf_runs(model, ids_t[:S], don_t[:S], mask, 0, dev)
        if attrib:
            hf32_score, hf32_loss, hf32_as, hf32_mem = hf_attribution(model, ids_a, don_a, mask_a, typ_t, T, K, 1, dev)
            print(f"{shape}: HF fp32 attribution round {hf32_as:.3f} s", flush=True)
        del model
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16,
                                                     attn_implementation="eager").to(dev)
        model.eval()
        install(model)
        hf16_clean, hf16_patched, hf16_s = hf_runs(model, ids_t, don_t, mask, a.reps, dev)
        if attrib:
            hf16_score, hf16_loss, hf16_as, hf16_mem = hf_attribution(model, ids_a, don_a, mask_a, typ_t, T, K, a.reps, dev)
            print(f"{shape}: HF bf16 attribution round {hf16_as:.3f} s", flush=True)
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()

        dump = os.path.join(a.work, shape + ".bin")
        o16_clean, o16_patched, o16_s = ours(a.bin, folder, backend, "bf16", B, T, a.reps, dump)
        o32_clean, o32_patched, _ = ours(a.bin, folder, backend, "fp32", S, T, 1, dump)
        c32_clean, c32_patched, _ = ours(a.bin, folder, "cpu", "fp32", S, T, 1, dump)

        for what, o, h in (("clean", o32_clean, hf32_clean), ("patched", o32_patched, hf32_patched)):
            e = row_error(o, h)
            row(shape, f"fp32 {backend} vs HF fp32, {what}, {S} prompts", f"{e:.2e}", "1e-4", e <= 1e-4)
        for what, o, c in (("clean", o32_clean, c32_clean), ("patched", o32_patched, c32_patched)):
            e = row_error(o, c)
            row(shape, f"fp32 {backend} vs our cpu, {what}, {S} prompts", f"{e:.2e}", "1e-4", e <= 1e-4)
        for what, o, h16, h32 in (("clean", o16_clean, hf16_clean, hf32_clean),
                                  ("patched", o16_patched, hf16_patched, hf32_patched)):
            ours_to_32, hf_to_32 = row_error(o[:S], h32), row_error(h16[:S], h32)
            limit = 1.5 * hf_to_32 + 1e-3
            row(shape, f"bf16 {backend} vs HF fp32, {what} (HF bf16: {hf_to_32:.1e})", f"{ours_to_32:.2e}",
                f"{limit:.1e}", ours_to_32 <= limit)
            e = row_error(o, h16)
            agree = float((o.argmax(1) == h16.argmax(1)).double().mean())
            row(shape, f"bf16 {backend} vs HF bf16, {what}, {B} prompts", f"{e:.2e}", "-", True,
                f"argmax agreement {agree:.3f}")
        tok = B * T
        ratio = hf16_s / o16_s
        row(shape, f"patched tokens/s bf16, ours vs HF eager ({B}x{T})", f"{tok / o16_s:.0f}", "-", True,
            f"HF {tok / hf16_s:.0f} tok/s; ratio {ratio:.1f}x (target >= 5)")
        tf = matrix_flops(cfg, B, T) / o16_s / 1e12
        row(shape, "achieved TFLOP/s of the patched run (bf16)", f"{tf:.1f}", "-", True,
            f"{100 * tf / a.peak:.0f}% of {a.peak:.0f} peak")
        if attrib:
            adump = os.path.join(a.work, shape + ".scores.bin")
            o32_score, o32_loss, o32_kv, o32_gpu = ours_attribution(a.bin, folder, backend, "fp32", B, T, K, 1, adump, dev)
            o16_score, o16_loss, o16_kv, o16_gpu = ours_attribution(a.bin, folder, backend, "bf16", B, T, K, a.reps,
                                                                    adump, dev)
            h32, h16 = hf32_score.numpy().ravel(), hf16_score.numpy().ravel()
            # fp32 scores: the largest difference over all head units, relative to the largest HF score. Two
            # fp32 engines summing in other orders through every layer forward and back: the forward's
            # logits agree to 1e-4 of the row (above); the scores are products of activations and gradients
            # and carry both errors, so 1e-3 of the largest (10x the forward's) -- a wrong term (a missed
            # softcap, a donor edge sending gradient, a 1/B factor) moves them by percent or more.
            scale = float(np.abs(h32).max()) or 1.0
            e = float(np.abs(o32_score - h32).max()) / scale
            big = np.abs(h32) >= 1e-2 * scale
            unit_rel = float((np.abs(o32_score - h32)[big] / np.abs(h32)[big]).max()) if big.any() else 0.0
            row(shape, f"attrib fp32 {backend} vs HF autograd, head scores", f"{e:.2e}", "1e-3", e <= 1e-3,
                f"{len(h32)} units, {B}x{T}+{K}; worst unit >= 1% of max: {unit_rel:.1e}")
            le = abs(o32_loss - hf32_loss) / abs(hf32_loss)
            row(shape, f"attrib fp32 {backend} vs HF autograd, loss", f"{le:.2e}", "1e-4", le <= 1e-4,
                f"ours {o32_loss:.6g}, HF {hf32_loss:.6g} (sum over {B} prompts)")
            rho, rho_hf = spearman(o16_score, o32_score), spearman(h16, h32)
            limit = min(0.99, rho_hf - 0.01)
            row(shape, f"attrib bf16 vs fp32 (ours), Spearman, all units", f"{rho:.4f}", f"{limit:.3f}", rho >= limit,
                f"HF bf16 vs HF fp32: {rho_hf:.4f}; ours bf16 vs HF bf16: {spearman(o16_score, h16):.4f}")
            o16_s_a, o32_s_a = float(o16_kv["round_s"]), float(o32_kv["round_s"])
            row(shape, f"attribution round bf16, ours vs HF autograd ({B}x{T})", f"{o16_s_a:.3f} s", "-", True,
                f"HF {hf16_as:.3f} s; ratio {hf16_as / o16_s_a:.1f}x (target >= 5); donor {float(o16_kv['donor_s']):.3f} "
                f"+ fwd/bwd {float(o16_kv['backward_s']):.3f} + scores {float(o16_kv['scores_s']):.3f} s")
            row(shape, f"attribution round fp32, ours vs HF autograd ({B}x{T})", f"{o32_s_a:.3f} s", "-", True,
                f"HF {hf32_as:.3f} s; ratio {hf32_as / o32_s_a:.1f}x (1 timed rep)")
            ours_pass = int(o16_kv["backward_peak_bytes"]) + int(o16_kv["donor_bytes"])
            row(shape, "attribution memory bf16, ours (backward_bytes)", gib(ours_pass), "-", True,
                f"peak of model_backward + donor caches, weights excluded; GPU used during the run (nvidia-smi, "
                f"weights + context + pool): {gib(o16_gpu)}; HF peak allocated beyond its weights: {gib(hf16_mem)}")
            row(shape, "attribution memory fp32, ours (backward_bytes)",
                gib(int(o32_kv["backward_peak_bytes"]) + int(o32_kv["donor_bytes"])), "-", True,
                f"GPU used during the run: {gib(o32_gpu)}; HF peak allocated beyond its weights: {gib(hf32_mem)}")
        shutil.rmtree(folder, ignore_errors=True)
        print(f"{shape}: done in {time.time() - t_shape:.1f} s", flush=True)

    print("\nshape          check                                               value      limit result note")
    for r in rows:
        print(f"{r[0]:14s} {r[1]:50s} {r[2]:>12s} {r[3]:>10s} {r[4]:6s} {r[5]}")
    print("device_check.py:", "FAILED" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
