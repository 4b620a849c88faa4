#!/usr/bin/env python3
"""Independent Python reference for edge patching (attention-edge ablation, head units, donor passes).

Needs the fixture venv made by tools/make_venv.sh (torch 2.4.1 CPU, transformers 4.44.2,
tokenizers 0.19.1, safetensors 0.4.5, numpy<2); the versions are asserted below:

    tools/make_venv.sh .venv
    .venv/bin/python tools/make_patch_fixtures.py

Reads tests/fixtures/models/{gemma2,llama3,smollm,phi2}-tiny and datasets/pairs/, writes (replacing):
    tests/fixtures/patch/plans.json
    tests/fixtures/patch/<model>.safetensors
    tests/fixtures/patch/checks.txt          (the self-check numbers printed below)
With --interventions instead (issue 21: k-only, v-only and zeroed edges; the files above are not touched):
    tests/fixtures/patch/interv_plans.json, <model>.interv.safetensors, interv_checks.txt
With --mean instead (issue 21: the mean donor; the files above are not touched):
    tests/fixtures/patch/mean_plans.json, <model>.mean.safetensors, mean_checks.txt
See tests/fixtures/patch/README.md for the layout and the exact semantics.

Method (as the original code did): the eager attention forward of the HF modules (Gemma2Attention,
LlamaAttention, PhiAttention of transformers 4.44.2) is replaced by a patched copy that receives the
donor K/V/z and a per-(head, receiver, sender) donor-index map; everything else is the unmodified HF
model. Inside, k*/v* are materialised per (h, B, A) with an explicit gather (deliberately naive; the
C side does it differently). Deterministic: running it twice gives byte-identical files.
"""
import json
import math
import os
import sys
import types as pytypes

import numpy as np
import torch

import safetensors
import tokenizers
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

assert torch.__version__.split("+")[0] == "2.4.1", torch.__version__
assert transformers.__version__ == "4.44.2", transformers.__version__
assert tokenizers.__version__ == "0.19.1", tokenizers.__version__
assert safetensors.__version__ == "0.4.5", safetensors.__version__
assert int(np.__version__.split(".")[0]) < 2, np.__version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, "tests", "fixtures", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "patch")
DATA = os.path.join(ROOT, "datasets")
MODELS = ["gemma2-tiny", "llama3-tiny", "smollm-tiny", "phi2-tiny"]
N_GEN = 10
N_DEMOS = 3
K_DONORS = 2
TOL = 1e-5

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

TYPE_CODES = {"bos": 0, "x": 1, "t": 2, "y": 3, "n": 4, "query": 5, "last": 6}  # target = 7 (unused)
NONE_TYPE = -1  # generated positions in the no-cache cross-check: never match any rule / head unit

# --------------------------------------------------------------------------------------------------
# Plans (shared by all models: every model has >= 2 layers and >= 4 query heads)
# --------------------------------------------------------------------------------------------------


def rule(sender, receiver, relation="any", layers="all", heads="all", donor=0):
    return {"sender": sender, "receiver": receiver, "relation": relation, "layers": layers, "heads": heads,
            "donor": donor}


def irule(sender, receiver, intervention, relation="any", layers="all", heads="all", donor=0):
    """A rule with an intervention (kv, k, v, zero); a zero rule names no donor."""
    r = rule(sender, receiver, relation, layers, heads, donor)
    r["intervention"] = intervention
    if intervention == "zero":
        del r["donor"]
    return r


def hunit(layer, head, typ, donor=0):
    return {"layer": layer, "head": head, "type": typ, "donor": donor}


PLANS = [
    {"name": "clean", "rules": [], "heads": []},
    {"name": "y_to_last", "rules": [rule(["y"], ["last"], "any")], "heads": []},
    {"name": "x_to_y_same", "rules": [rule(["x"], ["y"], "same")], "heads": []},
    {"name": "y_to_y_earlier", "rules": [rule(["y"], ["y"], "earlier")], "heads": []},
    {"name": "all_to_last_layers01", "rules": [rule("all", ["last"], "any", layers=[0, 1])], "heads": []},
    {"name": "per_head", "rules": [rule(["x", "y"], ["last"], "any", layers=[1], heads=[0, 2])], "heads": []},
    {"name": "multi_donor", "rules": [rule(["y"], ["last"], "any", donor=0),
                                      rule(["x"], ["y"], "same", donor=1),
                                      rule(["t"], ["last"], "any", donor=1)], "heads": []},
    {"name": "head_units", "rules": [],
     "heads": [hunit(0, 1, "last", 0), hunit(1, 0, "y", 0), hunit(1, 3, "query", 0)]},
    {"name": "mixed", "rules": [rule(["x", "y"], ["last", "query"], "any", layers=[0, 1], heads=[1, 2, 3])],
     "heads": [hunit(0, 2, "last", 0), hunit(1, 1, "y", 1)]},
    {"name": "all_edges_donor0", "rules": [rule("all", "all", "any", donor=0)], "heads": []},
]

# Interventions (issue 21): k-only, v-only and zeroed edges. Written to interv_plans.json and
# <model>.interv.safetensors by --interventions; the fixtures above stay as they are.
IV_PLANS = [
    {"name": "k_y_to_last", "rules": [irule(["y"], ["last"], "k")], "heads": []},
    {"name": "v_y_to_last", "rules": [irule(["y"], ["last"], "v")], "heads": []},
    {"name": "zero_y_to_last", "rules": [irule(["y"], ["last"], "zero")], "heads": []},
    # every edge into last of layer 0 removed, its own included: the row has nothing left (outputs 0)
    {"name": "zero_into_last_layer0", "rules": [irule("all", ["last"], "zero", layers=[0])], "heads": []},
    {"name": "mixed_interventions", "rules": [irule(["x"], ["y"], "zero", "same", heads=[0, 1]),
                                              irule(["y"], ["last"], "k", layers=[1], donor=1),
                                              irule(["x", "y"], ["query", "last"], "v", heads=[1, 2, 3]),
                                              irule(["t"], ["last"], "kv", donor=1),
                                              irule(["n"], ["last", "y"], "zero", "earlier")],
     "heads": [hunit(1, 0, "y", 0)]},
    {"name": "zero_everything", "rules": [irule("all", "all", "zero")], "heads": []},
]
IV_SOURCES = {"kv": 0, "k": 1, "v": 2, "zero": 3}

# The mean donor (issue 21, donor kind "mean"): written to mean_plans.json and <model>.mean.safetensors by
# --mean. Donor 0 is the mean over the fixture's 3 prompts of the clean K/V/z at the same (token type,
# example index, offset in the span); donor 1 is the token donor 1 of the main fixture, its pass nested
# over the mean donor 0 as for any donor 0.
MEAN_PLANS = [
    {"name": "mean_y_to_last", "rules": [rule(["y"], ["last"], "any")], "heads": []},
    {"name": "mean_x_to_y_same", "rules": [rule(["x"], ["y"], "same")], "heads": []},
    {"name": "mean_all_edges", "rules": [rule("all", "all", "any")], "heads": []},
    {"name": "mean_nested", "rules": [rule(["x"], ["y"], "same", donor=0), rule(["y"], ["last"], "any", donor=1)],
     "heads": [hunit(1, 0, "y", 0), hunit(0, 1, "last", 0)]},
]

# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------
# (task, how many of its cheapest pairs to draw from, seed): cheap = few tokens under every tiny tokenizer,
# so the prompts stay short (about 17, 30 and 37 tokens).
PROMPT_TASKS = [("present-past", 10, 11), ("country-capital", 10, 22), ("person-sport", 6, 33)]


def load_pairs(name):
    with open(os.path.join(DATA, "pairs", name + ".json"), encoding="utf-8") as f:
        return [(p["input"], p["output"]) for p in json.load(f)]


def prompt_pairs(toks):
    """Per prompt: N_DEMOS demonstrations + one query pair, the same for every model: a seeded draw from the
    task's M cheapest pairs (cost = max over the tokenizers of len(enc(x)) + len(enc(" " + y)))."""
    def cost(p):
        return max(len(t(p[0], add_special_tokens=False)["input_ids"]) +
                   len(t(" " + p[1], add_special_tokens=False)["input_ids"]) for t in toks)
    out = []
    for name, m, seed in PROMPT_TASKS:
        pairs = load_pairs(name)
        cheap = sorted(range(len(pairs)), key=lambda i: (cost(pairs[i]), i))[:m]
        perm = np.random.RandomState(seed).permutation(m)
        out.append([pairs[cheap[i]] for i in perm[:N_DEMOS + 1]])
    return out


def prompt_text(pairs):
    return "".join(f"{x}: {y}\n" for x, y in pairs[:-1]) + pairs[-1][0] + ":"


def build_prompt(tok, pairs):
    """tokens, types, index (int lists). Each segment encoded separately, add_special_tokens=False."""
    toks, typ, idx = [], [], []

    def add(text, t, i):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= 1, text
        toks.extend(ids)
        typ.extend([TYPE_CODES[t]] * len(ids))
        idx.extend([i] * len(ids))

    bos = tok("", add_special_tokens=True)["input_ids"]
    assert len(bos) <= 1
    if bos:
        toks.append(bos[0])
        typ.append(TYPE_CODES["bos"])
        idx.append(-1)
    for k, (x, y) in enumerate(pairs[:-1]):
        add(x, "x", k)
        add(":", "t", k)
        add(" " + y, "y", k)
        add("\n", "n", k)
    add(pairs[-1][0], "query", N_DEMOS)
    add(":", "last", N_DEMOS)
    return toks, typ, idx


def make_donors(tok, V, toks, typ, seed):
    special = set(tok.all_special_ids)
    special |= {i for i, a in tok.added_tokens_decoder.items() if a.special}
    allowed = np.array([i for i in range(V) if i not in special], dtype=np.int64)
    rs = np.random.RandomState(seed)
    donors = []
    for _ in range(K_DONORS):
        d = list(toks)
        for p, t in enumerate(typ):
            if t in (TYPE_CODES["x"], TYPE_CODES["y"]):
                d[p] = int(allowed[rs.randint(len(allowed))])
        donors.append(d)
    assert donors[0] != donors[1]
    return donors


# --------------------------------------------------------------------------------------------------
# Plan compilation: per-layer edge donor maps [H, TB, TA] (-1 = not ablated) and head-unit lists
# --------------------------------------------------------------------------------------------------
def type_set(spec):
    if spec == "all":
        return None
    assert isinstance(spec, list) and all(s in TYPE_CODES for s in spec), spec
    return [TYPE_CODES[s] for s in spec]


def compile_edges(plan, typ, idx, L, H):
    """em[l] = LongTensor [H, T, T]: donor index of edge (l, h, A->B) at [h, B, A], or -1.
    First rule in list order that matches decides. Only causal edges (A <= B) are marked."""
    typ = torch.tensor(typ)
    idx = torch.tensor(idx)
    T = len(typ)
    em = [torch.full((H, T, T), -1, dtype=torch.long) for _ in range(L)]
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]  # [B, A]
    for r in plan["rules"]:
        snd, rcv = type_set(r["sender"]), type_set(r["receiver"])
        s_ok = torch.ones(T, dtype=torch.bool) if snd is None else torch.isin(typ, torch.tensor(snd))
        r_ok = torch.ones(T, dtype=torch.bool) if rcv is None else torch.isin(typ, torch.tensor(rcv))
        if snd is None:
            s_ok &= typ != NONE_TYPE
        if rcv is None:
            r_ok &= typ != NONE_TYPE
        m = r_ok[:, None] & s_ok[None, :] & causal
        iA, iB = idx[None, :], idx[:, None]
        if r["relation"] == "same":
            m &= (iA == iB) & (iA >= 0)
        elif r["relation"] == "earlier":
            m &= (iA >= 0) & (iA < iB)
        else:
            assert r["relation"] == "any", r
        layers = range(L) if r["layers"] == "all" else r["layers"]
        heads = range(H) if r["heads"] == "all" else r["heads"]
        d = int(r["donor"])
        assert 0 <= d < K_DONORS
        for l in layers:
            assert 0 <= l < L
            for h in heads:
                assert 0 <= h < H
                free = em[l][h] == -1
                em[l][h][m & free] = d
    return em


def compile_edges_iv(plan, typ, idx, L, H):
    """The intervention form: per layer [H, T, T] (at [h, B, A]) the donor whose key the edge reads, the
    donor whose value it reads (-1: the current pass's) and whether it is removed. First rule in list order
    that matches decides (as compile_edges); only causal edges are marked."""
    typ = torch.tensor(typ)
    idx = torch.tensor(idx)
    T = len(typ)
    ek = [torch.full((H, T, T), -1, dtype=torch.long) for _ in range(L)]
    ev = [torch.full((H, T, T), -1, dtype=torch.long) for _ in range(L)]
    rm = [torch.zeros((H, T, T), dtype=torch.bool) for _ in range(L)]
    done = [torch.zeros((H, T, T), dtype=torch.bool) for _ in range(L)]
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]  # [B, A]
    for r in plan["rules"]:
        snd, rcv = type_set(r["sender"]), type_set(r["receiver"])
        s_ok = (typ != NONE_TYPE) if snd is None else torch.isin(typ, torch.tensor(snd))
        r_ok = (typ != NONE_TYPE) if rcv is None else torch.isin(typ, torch.tensor(rcv))
        m = r_ok[:, None] & s_ok[None, :] & causal
        iA, iB = idx[None, :], idx[:, None]
        if r["relation"] == "same":
            m &= (iA == iB) & (iA >= 0)
        elif r["relation"] == "earlier":
            m &= (iA >= 0) & (iA < iB)
        else:
            assert r["relation"] == "any", r
        src = r.get("intervention", "kv")
        assert src in IV_SOURCES, src
        d = -1 if src == "zero" else int(r["donor"])
        assert src == "zero" or 0 <= d < K_DONORS
        layers = range(L) if r["layers"] == "all" else r["layers"]
        heads = range(H) if r["heads"] == "all" else r["heads"]
        for l in layers:
            for h in heads:
                new = m & ~done[l][h]
                if src == "zero":
                    rm[l][h][new] = True
                if src in ("kv", "k"):
                    ek[l][h][new] = d
                if src in ("kv", "v"):
                    ev[l][h][new] = d
                done[l][h] |= m
    return ek, ev, rm


def restrict_to_donor0_iv(ek, ev, rm, hu):
    """The donor-0 part of an intervention plan: the key / value reads of donor 0, no removals."""
    ek0 = [torch.where(e == 0, e, torch.full_like(e, -1)) for e in ek]
    ev0 = [torch.where(e == 0, e, torch.full_like(e, -1)) for e in ev]
    rm0 = [torch.zeros_like(r) for r in rm]
    hu0 = [[x for x in units if x[2] == 0] for units in hu]
    return ek0, ev0, rm0, hu0


def compile_heads(plan, typ, L, H):
    """hu[l] = list of (h, position mask [T], donor); first unit in list order covering (l, h, B) decides."""
    typ = torch.tensor(typ)
    hu = [[] for _ in range(L)]
    for u in plan["heads"]:
        l, h, d = u["layer"], u["head"], u["donor"]
        assert 0 <= l < L and 0 <= h < H and 0 <= d < K_DONORS
        hu[l].append((h, typ == TYPE_CODES[u["type"]], d))
    return hu


def restrict_to_donor0(em, hu):
    """For the pass over donor d > 0: only the edges / head units whose donor is 0."""
    em0 = [torch.where(e == 0, e, torch.full_like(e, -1)) for e in em]
    hu0 = [[x for x in units if x[2] == 0] for units in hu]
    return em0, hu0


# --------------------------------------------------------------------------------------------------
# Patched attention
# --------------------------------------------------------------------------------------------------
class State:
    """What the patched attention reads and records during one model call.
    mode 'off': original HF forward. 'prompt': whole sequence, edge map + head units + donors applied,
    k/v/z recorded and the KV cache (re)started. 'decode': new positions appended to the cache, plain
    attention over all cached positions."""

    def __init__(self):
        self.mode = "off"
        self.em = None        # list per layer of [H, T, T] long, or None
        self.iv = None        # interventions: (ek, ev, rm) lists per layer of [H, T, T], or None (then em)
        self.hu = None        # list per layer of [(h, mask[T], d)], or None
        self.dk = None        # donor keys: list over donors of list over layers of [n_kv, T, hd]
        self.dv = None
        self.dz = None        # donor z: list over donors of list over layers of [H, T, hd]
        self.rec_k, self.rec_v, self.rec_z = {}, {}, {}
        self.rec_p = {}       # attention probabilities [H, Tq, Tk] per layer of prompt passes (make_metrics_fixtures.py)
        self.cache_k, self.cache_v = {}, {}
        self.mask_checked = 0


ST = State()


def arch_of(attn):
    n = type(attn).__name__
    assert n in ("Gemma2Attention", "LlamaAttention", "PhiAttention"), n
    return n[:-len("Attention")].lower()


def patched_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                    output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None,
                    **kwargs):
    if ST.mode == "off":
        kw = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_value=past_key_value,
                  output_attentions=output_attentions, use_cache=use_cache, cache_position=cache_position)
        if position_embeddings is not None:
            kw["position_embeddings"] = position_embeddings
        return self._orig_forward(hidden_states, **kw, **kwargs)
    assert past_key_value is None and not output_attentions
    arch = arch_of(self)
    mod = sys.modules[type(self).__module__]
    l = self.layer_idx
    H, G, hd = self.num_heads, self.num_key_value_heads, self.head_dim
    rep = H // G
    bsz, q_len, _ = hidden_states.size()
    assert bsz == 1
    if arch == "llama":
        assert self.config.pretraining_tp == 1

    # ---- projections and RoPE, exactly as HF 4.44.2 eager ----
    q = self.q_proj(hidden_states)
    k = self.k_proj(hidden_states)
    v = self.v_proj(hidden_states)
    if arch == "phi":
        assert not self.qk_layernorm
    q = q.view(bsz, q_len, H, hd).transpose(1, 2)
    k = k.view(bsz, q_len, G, hd).transpose(1, 2)
    v = v.view(bsz, q_len, G, hd).transpose(1, 2)
    past = 0 if ST.mode == "prompt" else ST.cache_k[l].shape[1]
    assert position_ids is not None and position_ids.tolist() == [list(range(past, past + q_len))]
    if arch == "gemma2":
        cos, sin = self.rotary_emb(v, position_ids)
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    elif arch == "llama":
        if position_embeddings is None:
            cos, sin = self.rotary_emb(v, position_ids)
        else:
            cos, sin = position_embeddings
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    else:  # phi: partial rotary; cos/sin table long enough for the absolute positions
        cos, sin = self.rotary_emb(v, seq_len=past + q_len)
        rd = self.rotary_emb.dim
        q_rot, k_rot = mod.apply_rotary_pos_emb(q[..., :rd], k[..., :rd], cos, sin, position_ids)
        q = torch.cat((q_rot, q[..., rd:]), dim=-1)
        k = torch.cat((k_rot, k[..., rd:]), dim=-1)
    q, k, v = q[0], k[0], v[0]  # [H, Tq, hd], [G, Tq, hd]

    # ---- KV cache (current pass's post-RoPE k/v) ----
    if ST.mode == "prompt":
        k_all, v_all = k, v
        ST.rec_k[l], ST.rec_v[l] = k.detach().clone(), v.detach().clone()
    else:
        k_all = torch.cat([ST.cache_k[l], k], dim=1)
        v_all = torch.cat([ST.cache_v[l], v], dim=1)
    ST.cache_k[l], ST.cache_v[l] = k_all, v_all
    Tk = k_all.shape[1]

    # ---- k*, v* per (h, B, A) by explicit gather: option 0 = current pass, option 1 + d = donor d ----
    removed = None
    if ST.mode == "prompt" and ST.iv is not None:  # k* and v* gathered separately, removed edges masked
        sel_k, sel_v, removed = ST.iv[0][l] + 1, ST.iv[1][l] + 1, ST.iv[2][l]
        opts_k = torch.stack([k_all] + [ST.dk[d][l] for d in range(len(ST.dk))])
        opts_v = torch.stack([v_all] + [ST.dv[d][l] for d in range(len(ST.dv))])
    elif ST.mode == "prompt" and ST.em is not None:
        sel = ST.em[l] + 1  # [H, Tq, Tk]
        sel_k = sel_v = sel
        opts_k = torch.stack([k_all] + [ST.dk[d][l] for d in range(len(ST.dk))])  # [1+K, G, Tk, hd]
        opts_v = torch.stack([v_all] + [ST.dv[d][l] for d in range(len(ST.dv))])
    else:
        sel_k = sel_v = torch.zeros((H, q_len, Tk), dtype=torch.long)
        opts_k, opts_v = k_all[None], v_all[None]
    g = (torch.arange(H) // rep)[:, None, None]
    a = torch.arange(Tk)[None, None, :]
    kstar = opts_k[sel_k, g, a]  # [H, Tq, Tk, hd]
    vstar = opts_v[sel_v, g, a]

    # ---- scores, scaling, softcap, mask, softmax: HF's order of operations ----
    if arch == "phi":
        s = (q.to(torch.float32)[:, :, None, :] * kstar.to(torch.float32)).sum(-1) / math.sqrt(hd)
    else:
        s = (q[:, :, None, :] * kstar).sum(-1)
        if arch == "gemma2":
            s = s * self.scaling
            cap = self.config.attn_logit_softcapping
            if cap is not None:
                s = s / cap
                s = torch.tanh(s)
                s = s * cap
        else:
            s = s / math.sqrt(hd)
    qpos = torch.arange(past, past + q_len)[:, None]
    kpos = torch.arange(Tk)[None, :]
    allowed = kpos <= qpos
    if arch == "gemma2" and self.sliding_window is not None:  # even layers
        allowed &= (qpos - kpos) < self.sliding_window
    min_dtype = torch.finfo(s.dtype).min
    mask = torch.where(allowed, torch.zeros((), dtype=s.dtype), torch.full((), min_dtype, dtype=s.dtype))
    if ST.mode == "prompt" and attention_mask is not None:  # same mask HF built (causal + sliding)
        hm = attention_mask[0, 0, :, :Tk]
        assert torch.equal(hm == 0, allowed) and bool((hm[~allowed] == min_dtype).all())
        ST.mask_checked += 1
    s = s + mask
    if removed is not None:  # a removed edge leaves the softmax; a row with nothing left outputs 0
        s = s.masked_fill(removed, float("-inf"))
        empty = ~(allowed[None] & ~removed).any(-1, keepdim=True)  # [H, Tq, 1]
        s = s.masked_fill(empty, 0.0)
    p = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
    if removed is not None:
        p = p.masked_fill(empty, 0.0)
    if ST.mode == "prompt":
        ST.rec_p[l] = p.detach().clone()
    z = (p[..., None] * vstar).sum(2)  # [H, Tq, hd]

    # ---- head units (prompt pass only) ----
    if ST.mode == "prompt" and ST.hu is not None and ST.hu[l]:
        done = torch.zeros((H, q_len), dtype=torch.bool)
        for h, pm, d in ST.hu[l]:
            m = pm & ~done[h]
            z[h, m] = ST.dz[d][l][h, m]
            done[h] |= pm
    if ST.mode == "prompt":
        ST.rec_z[l] = z.detach().clone()

    out = z.transpose(0, 1).reshape(bsz, q_len, H * hd)
    out = self.dense(out) if arch == "phi" else self.o_proj(out)
    return out, None, past_key_value


def install(model):
    for layer in model.model.layers:
        attn = layer.self_attn
        arch_of(attn)
        attn._orig_forward = attn.forward
        attn.forward = pytypes.MethodType(patched_forward, attn)


# --------------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------------
def run_prompt(model, tokens, em=None, hu=None, donors=None, iv=None):
    """One patched prompt pass. donors = list of dicts {k, v, z} (lists over layers); iv = (ek, ev, rm)
    instead of em for a plan with interventions. Returns logits [T, V] and this pass's recorded {k, v, z}."""
    L = len(model.model.layers)
    ST.mode = "prompt"
    ST.em, ST.hu, ST.iv = em, hu, iv
    if donors is not None:
        ST.dk = [d["k"] for d in donors]
        ST.dv = [d["v"] for d in donors]
        ST.dz = [d["z"] for d in donors]
    else:
        assert em is None and hu is None and iv is None
    ST.rec_k, ST.rec_v, ST.rec_z, ST.cache_k, ST.cache_v = {}, {}, {}, {}, {}
    ids = torch.tensor([tokens])
    T = len(tokens)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=torch.arange(T)[None], use_cache=False).logits[0]
    finally:
        ST.mode = "off"
        ST.iv = None
    rec = {"k": [ST.rec_k[l] for l in range(L)], "v": [ST.rec_v[l] for l in range(L)],
           "z": [ST.rec_z[l] for l in range(L)]}
    return logits.float().clone(), rec


def decode_step(model, tok, pos):
    ST.mode = "decode"
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[pos]]),
                           use_cache=False).logits[0, -1]
    finally:
        ST.mode = "off"
    return logits.float().clone()


def generate(model, tokens, em, hu, donors, iv=None):
    """Patched prompt pass (KV cache = this pass's k/v), then N_GEN greedy steps, unpatched."""
    logits, _ = run_prompt(model, tokens, em, hu, donors, iv=iv)
    steps = [logits[-1]]
    gen = [int(torch.argmax(logits[-1]))]
    for s in range(1, N_GEN):
        last = decode_step(model, gen[-1], len(tokens) + s - 1)
        steps.append(last)
        gen.append(int(torch.argmax(last)))
    return logits, gen, torch.stack(steps)


def donor_caches(model, plan_em, plan_hu, donor_tokens, clean0=None):
    """Donor 0: its own clean pass. Donor d > 0: pass over its tokens with the plan's donor-0 edges and
    donor-0 head units applied (reading donor 0's cache)."""
    if clean0 is None:
        _, clean0 = run_prompt(model, donor_tokens[0])
    caches = [clean0]
    em0, hu0 = restrict_to_donor0(plan_em, plan_hu)
    for d in range(1, len(donor_tokens)):
        _, rec = run_prompt(model, donor_tokens[d], em0, hu0, [clean0])
        caches.append(rec)
    return caches


def donor_caches_iv(model, iv, plan_hu, donor_tokens, clean0):
    """donor_caches for an intervention plan: donor d > 0 under the plan's donor-0 part."""
    caches = [clean0]
    ek0, ev0, rm0, hu0 = restrict_to_donor0_iv(*iv, plan_hu)
    for d in range(1, len(donor_tokens)):
        _, rec = run_prompt(model, donor_tokens[d], None, hu0, [clean0], iv=(ek0, ev0, rm0))
        caches.append(rec)
    return caches


def hf_cache_edit_y_to_last_iv(model, tokens, typ, donor_tokens, what):
    """Independent checks of k_y_to_last, v_y_to_last and zero_y_to_last with HF's own attention: prefill
    the clean prompt minus its final token into a DynamicCache, then run the final token as a decode step
    with, for "k" / "v", only the cached keys / values at y positions replaced by donor 0's (every layer),
    and for "zero", an attention mask hiding the y positions. As hf_cache_edit_y_to_last: not Gemma-2."""
    from transformers.cache_utils import DynamicCache
    assert ST.mode == "off" and typ[-1] == TYPE_CODES["last"] and TYPE_CODES["last"] not in typ[:-1]
    ysel = torch.tensor([t == TYPE_CODES["y"] for t in typ[:-1]])
    T = len(tokens)
    with torch.no_grad():
        c = DynamicCache()
        model(input_ids=torch.tensor([tokens[:-1]]), use_cache=True, past_key_values=c)
        mask = torch.ones((1, T), dtype=torch.long)
        if what == "zero":
            mask[0, :-1][ysel] = 0
        else:
            dc = DynamicCache()
            model(input_ids=torch.tensor([donor_tokens[:-1]]), use_cache=True, past_key_values=dc)
            for l in range(len(c.key_cache)):
                if what == "k":
                    c.key_cache[l][0][:, ysel] = dc.key_cache[l][0][:, ysel]
                else:
                    c.value_cache[l][0][:, ysel] = dc.value_cache[l][0][:, ysel]
        out = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, position_ids=torch.tensor([[T - 1]]),
                    use_cache=True, past_key_values=c)
    return out.logits[0, -1].float()


def hf_without_attention(model, tokens):
    """Independent check of zero_everything: the unmodified HF model with every attention output (the input
    of o_proj / dense) replaced by zeros, through forward pre-hooks."""
    assert ST.mode == "off"
    hooks = []
    for layer in model.model.layers:
        proj = layer.self_attn.dense if hasattr(layer.self_attn, "dense") else layer.self_attn.o_proj
        hooks.append(proj.register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),)))
    try:
        return hf_logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()


def hf_logits(model, tokens):
    assert ST.mode == "off"
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().clone()


def hf_greedy_nocache(model, tokens, n):
    cur, gen, steps = list(tokens), [], []
    for _ in range(n):
        last = hf_logits(model, cur)[-1]
        steps.append(last)
        gen.append(int(torch.argmax(last)))
        cur.append(gen[-1])
    return gen, torch.stack(steps)


def hf_cache_edit_y_to_last(model, tokens, typ, donor_tokens):
    """Independent check of y_to_last with HF's own (unpatched) attention: prefill the clean prompt minus
    its final token into a DynamicCache, overwrite the cached k/v at y positions (every layer) with donor 0's
    (from donor 0's own prefill), then run the final token as a decode step. Valid because the final
    position is the only 'last' token and no prompt position reads from it. Not for Gemma-2 (4.44.2's
    Gemma-2 decoder mask does not work with a DynamicCache)."""
    from transformers.cache_utils import DynamicCache
    assert ST.mode == "off" and typ[-1] == TYPE_CODES["last"] and TYPE_CODES["last"] not in typ[:-1]
    ysel = torch.tensor([t == TYPE_CODES["y"] for t in typ[:-1]])
    with torch.no_grad():
        c = DynamicCache()
        model(input_ids=torch.tensor([tokens[:-1]]), use_cache=True, past_key_values=c)
        dc = DynamicCache()
        model(input_ids=torch.tensor([donor_tokens[:-1]]), use_cache=True, past_key_values=dc)
        for l in range(len(c.key_cache)):
            c.key_cache[l][0][:, ysel] = dc.key_cache[l][0][:, ysel]
            c.value_cache[l][0][:, ysel] = dc.value_cache[l][0][:, ysel]
        out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, past_key_values=c)
    return out.logits[0, -1].float()


def nocache_patched_generation(model, tokens, typ, idx, gen, plan, caches, L, H):
    """Cross-check of the cached decode: full patched reruns over prompt + gen[:j], generated positions
    typed NONE (match nothing); donor tensors zero-padded (padded entries are never selected)."""
    steps = []
    T = len(tokens)
    for j in range(N_GEN):
        Tt = T + j
        typ_e, idx_e = list(typ) + [NONE_TYPE] * j, list(idx) + [-1] * j
        em = compile_edges(plan, typ_e, idx_e, L, H)
        hu = compile_heads(plan, typ_e, L, H)
        pad = []
        for c in caches:
            pad.append({key: [torch.cat([t, t.new_zeros(t.shape[0], j, t.shape[2])], dim=1) for t in c[key]]
                        for key in ("k", "v", "z")})
        logits, _ = run_prompt(model, list(tokens) + gen[:j], em, hu, pad)
        assert logits.shape[0] == Tt
        steps.append(logits[-1])
    return torch.stack(steps)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
# The byte-stable safetensors writer of the model fixtures (this folder is on sys.path when run as a script).
from make_tiny_models import save_safetensors_stable  # noqa: E402


def maxdiff(a, b):
    return float((a - b).abs().max())


def check_log():
    """The lines of a checks file, and log (print and keep a line) and check (log a failure and stop) on
    them; the first line names the library versions."""
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    def check(ok, what):
        if not ok:
            log(f"FAILED: {what}")
            raise SystemExit(1)

    log(f"transformers {transformers.__version__} torch {torch.__version__} tokenizers {tokenizers.__version__} "
        f"safetensors {safetensors.__version__}")
    return lines, log, check


def main():
    os.makedirs(OUT, exist_ok=True)
    lines, log, check = check_log()
    with open(os.path.join(OUT, "plans.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(PLANS, indent=1) + "\n")
    plan_names = [p["name"] for p in PLANS]
    pairs = prompt_pairs([AutoTokenizer.from_pretrained(os.path.join(MODELS_DIR, n)) for n in MODELS])
    texts = [prompt_text(p) for p in pairs]
    for i, t in enumerate(texts):
        log(f"prompt{i}: {t!r}")

    for mi, name in enumerate(MODELS):
        folder = os.path.join(MODELS_DIR, name)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()
        tok = AutoTokenizer.from_pretrained(folder)
        c = model.config
        L, H, V = c.num_hidden_layers, c.num_attention_heads, c.vocab_size
        assert L >= 2 and H >= 4
        install(model)
        tensors = {}
        gaps = []
        for pi, pp in enumerate(pairs):
            toks, typ, idx = build_prompt(tok, pp)
            T = len(toks)
            donors = make_donors(tok, V, toks, typ, seed=1000 * mi + 10 * pi + 7)
            tensors[f"prompt{pi}.tokens"] = torch.tensor(toks, dtype=torch.int32)
            tensors[f"prompt{pi}.types"] = torch.tensor(typ, dtype=torch.int32)
            tensors[f"prompt{pi}.index"] = torch.tensor(idx, dtype=torch.int32)
            tensors[f"prompt{pi}.donors"] = torch.tensor(donors, dtype=torch.int32)
            log(f"{name} prompt{pi}: T {T} (sliding window {getattr(c, 'sliding_window', None) if name.startswith('gemma') else None})")

            clean_hf = hf_logits(model, toks)
            donor0_hf = hf_logits(model, donors[0])
            gen_hf, steps_hf = hf_greedy_nocache(model, toks, N_GEN)
            _, donor0_rec = run_prompt(model, donors[0])
            # self-check: recorded k/v of the unpatched pass == HF's DynamicCache-free k (via patched-off run)
            same_tok = torch.tensor([a == b for a, b in zip(toks, donors[0])])

            for pj, plan in enumerate(PLANS):
                em = compile_edges(plan, typ, idx, L, H)
                hu = compile_heads(plan, typ, L, H)
                n_edges = sum(int((e >= 0).sum()) for e in em)
                caches = donor_caches(model, em, hu, donors, clean0=donor0_rec)
                logits, gen, steps = generate(model, toks, em, hu, caches)
                tensors[f"plan{pj}.prompt{pi}.logits"] = logits.contiguous()
                tensors[f"plan{pj}.prompt{pi}.generated"] = torch.tensor(gen, dtype=torch.int32)
                top2 = torch.topk(steps, 2, dim=-1).values
                gaps.append((float((top2[:, 0] - top2[:, 1]).min()), f"plan{pj} {plan['name']} prompt{pi}"))
                d_clean = maxdiff(logits, clean_hf)
                msg = f"  plan{pj} {plan['name']:<22} edges {n_edges:6d}  max|logits - clean| {d_clean:.4g}  gen {gen}"
                if plan["name"] == "clean":
                    check(n_edges == 0, "clean plan has no edges")
                    check(d_clean < TOL, f"{name} prompt{pi}: empty plan vs HF clean logits {d_clean}")
                    check(gen == gen_hf, f"{name} prompt{pi}: empty-plan generation {gen} vs HF no-cache {gen_hf}")
                    dg = maxdiff(steps, steps_hf)
                    check(dg < TOL, f"{name} prompt{pi}: empty-plan step logits vs HF no-cache {dg}")
                    msg += f"\n    CHECK empty plan: logits vs HF {d_clean:.3g}; gen == HF no-cache greedy: " \
                           f"{gen == gen_hf}; step logits vs HF no-cache {dg:.3g}"
                else:
                    check(d_clean > 1e-3, f"{name} prompt{pi} plan {plan['name']} changes nothing")
                if plan["name"] == "all_edges_donor0":
                    dd = maxdiff(logits[same_tok], donor0_hf[same_tok])
                    ref_dd = maxdiff(clean_hf[same_tok], donor0_hf[same_tok])
                    check(dd < TOL, f"{name} prompt{pi}: all edges donor0 vs donor0 clean logits {dd}")
                    msg += f"\n    CHECK all edges -> donor 0: at the {int(same_tok.sum())} positions where the " \
                           f"tokens agree, max|logits - donor0 clean| {dd:.3g} (clean vs donor0 there: {ref_dd:.3g})"
                if plan["name"] == "all_edges_donor0":  # not stored: every head unit of every type -> donor 0
                    hplan = {"name": "all_heads_donor0", "rules": [],
                             "heads": [hunit(l, h, t) for l in range(L) for h in range(H) for t in TYPE_CODES]}
                    hl, _ = run_prompt(model, toks, None, compile_heads(hplan, typ, L, H), caches)
                    dh = maxdiff(hl[same_tok], donor0_hf[same_tok])
                    check(dh < TOL, f"{name} prompt{pi}: all head units donor0 vs donor0 clean logits {dh}")
                    msg += f"\n    CHECK all head units -> donor 0: same positions, max|logits - donor0 clean| {dh:.3g}"
                if plan["name"] == "y_to_last" and not name.startswith("gemma2"):
                    hl = hf_cache_edit_y_to_last(model, toks, typ, donors[0])
                    dy = maxdiff(logits[-1], hl)
                    dp = maxdiff(logits[:-1], clean_hf[:-1])
                    check(dy < TOL and dp < TOL, f"{name} prompt{pi}: y_to_last vs HF cache edit {dy} {dp}")
                    msg += f"\n    CHECK y_to_last vs HF DynamicCache with donor k/v written at y: last position " \
                           f"{dy:.3g}; other positions vs clean {dp:.3g}"
                if plan["name"] in ("multi_donor", "mixed", "all_edges_donor0"):
                    same = [list(toks), list(toks)]
                    c_same = donor_caches(model, em, hu, same)
                    l_same, g_same, _ = generate(model, toks, em, hu, c_same)
                    ds = maxdiff(l_same, clean_hf)
                    check(ds < TOL and g_same == gen_hf, f"{name} prompt{pi}: donor = clean prompt, {plan['name']}: {ds}")
                    msg += f"\n    CHECK donors = clean tokens: max|logits - clean| {ds:.3g}, gen == clean gen {g_same == gen_hf}"
                if plan["name"] == "mixed":
                    steps_nc = nocache_patched_generation(model, toks, typ, idx, gen, plan, caches, L, H)
                    dn = maxdiff(steps, steps_nc)
                    check(dn < TOL, f"{name} prompt{pi}: cached vs no-cache patched generation {dn}")
                    msg += f"\n    CHECK cached decode vs no-cache patched reruns: step logits {dn:.3g}"
                log(msg)
        check(ST.mask_checked > 0, "HF masks compared")
        g = min(gaps)
        log(f"{name}: smallest top1-top2 gap over all greedy steps {g[0]:.3g} ({g[1]})")
        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
                "model": name, "plans": json.dumps(plan_names), "n_prompts": str(len(pairs)),
                "n_donors": str(K_DONORS), "n_generated": str(N_GEN)}
        for i, t in enumerate(texts):
            meta[f"prompt{i}.text"] = t
        save_safetensors_stable(tensors, os.path.join(OUT, name + ".safetensors"), meta)
    with open(os.path.join(OUT, "checks.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    log("all checks passed")


def main_interventions():
    """--interventions: interv_plans.json, <model>.interv.safetensors (the last position's logits and the
    greedy generation of every IV_PLANS plan on the main fixture's prompts) and interv_checks.txt."""
    lines, log, check = check_log()
    with open(os.path.join(OUT, "interv_plans.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(IV_PLANS, indent=1) + "\n")
    pairs = prompt_pairs([AutoTokenizer.from_pretrained(os.path.join(MODELS_DIR, n)) for n in MODELS])
    for mi, name in enumerate(MODELS):
        folder = os.path.join(MODELS_DIR, name)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()
        tok = AutoTokenizer.from_pretrained(folder)
        c = model.config
        L, H, V = c.num_hidden_layers, c.num_attention_heads, c.vocab_size
        install(model)
        main_file = load_file(os.path.join(OUT, name + ".safetensors"))  # the prompts and donors, as stored
        tensors = {}
        for pi, pp in enumerate(pairs):
            toks, typ, idx = build_prompt(tok, pp)
            donors = make_donors(tok, V, toks, typ, seed=1000 * mi + 10 * pi + 7)
            check(main_file[f"prompt{pi}.tokens"].tolist() == toks and main_file[f"prompt{pi}.donors"].tolist() == donors,
                  f"{name} prompt{pi}: the prompts differ from {name}.safetensors'")
            clean_hf = hf_logits(model, toks)
            _, donor0_rec = run_prompt(model, donors[0])
            for pj, plan in enumerate(IV_PLANS):
                iv = compile_edges_iv(plan, typ, idx, L, H)
                hu = compile_heads(plan, typ, L, H)
                caches = donor_caches_iv(model, iv, hu, donors, donor0_rec)
                logits, gen, _ = generate(model, toks, None, hu, caches, iv=iv)
                tensors[f"plan{pj}.prompt{pi}.last_logits"] = logits[-1].contiguous()
                tensors[f"plan{pj}.prompt{pi}.generated"] = torch.tensor(gen, dtype=torch.int32)
                d_clean = maxdiff(logits, clean_hf)
                check(d_clean > 1e-3, f"{name} prompt{pi} plan {plan['name']} changes nothing")
                msg = f"  plan{pj} {plan['name']:<22} removed {sum(int(r.sum()) for r in iv[2]):6d}  " \
                      f"max|logits - clean| {d_clean:.4g}  gen {gen}"
                # kv rules through the intervention path = the original path
                if plan["name"] == "k_y_to_last":
                    kvp = {"name": "kv", "rules": [rule(["y"], ["last"])], "heads": []}
                    em = compile_edges(kvp, typ, idx, L, H)
                    l_kv, _ = run_prompt(model, toks, em, hu, caches)
                    l_iv, _ = run_prompt(model, toks, None, hu, caches, iv=compile_edges_iv(kvp, typ, idx, L, H))
                    check(torch.equal(l_kv, l_iv), f"{name}: kv rules through the intervention path differ")
                    msg += "\n    CHECK kv rules through the intervention path == the original path: True"
                what = {"k_y_to_last": "k", "v_y_to_last": "v", "zero_y_to_last": "zero"}.get(plan["name"])
                if what and not name.startswith("gemma2"):
                    hl = hf_cache_edit_y_to_last_iv(model, toks, typ, donors[0], what)
                    dy = maxdiff(logits[-1], hl)
                    dp = maxdiff(logits[:-1], clean_hf[:-1])
                    check(dy < TOL and dp < TOL, f"{name} prompt{pi}: {plan['name']} vs HF {dy} {dp}")
                    msg += f"\n    CHECK {plan['name']} vs HF DynamicCache ({'mask hiding y' if what == 'zero' else 'donor ' + what + ' written at y'}): " \
                           f"last position {dy:.3g}; other positions vs clean {dp:.3g}"
                if plan["name"] == "zero_everything":
                    hz = hf_without_attention(model, toks)
                    dz = maxdiff(logits, hz)
                    check(dz < TOL, f"{name} prompt{pi}: zero_everything vs HF without attention outputs {dz}")
                    msg += f"\n    CHECK zero_everything vs HF with every attention output zeroed (o_proj pre-hook): {dz:.3g}"
                log(msg)
        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
                "model": name, "plans": json.dumps([p["name"] for p in IV_PLANS]), "n_prompts": str(len(pairs)),
                "n_donors": str(K_DONORS), "n_generated": str(N_GEN)}
        save_safetensors_stable(tensors, os.path.join(OUT, name + ".interv.safetensors"), meta)
    with open(os.path.join(OUT, "interv_checks.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    log("all checks passed")


def span_keys(typ, idx):
    """(type, example index, offset from the start of its run of equal type and index) per position."""
    keys = []
    for t in range(len(typ)):
        same = t > 0 and typ[t] == typ[t - 1] and idx[t] == idx[t - 1]
        keys.append((typ[t], idx[t], keys[-1][2] + 1 if same else 0))
    return keys


def mean_table(recs, keyss, L):
    """{key: {"k": [per layer [G, hd]], "v": ..., "z": [per layer [H, hd]]}}: the mean, in float64, over every
    (prompt, position) of that key, of the clean pass's recorded k / v / z (recs: per prompt, as run_prompt
    records them: per layer [G or H, T, hd])."""
    groups = {}
    for rec, keys in zip(recs, keyss):
        for t, key in enumerate(keys):
            groups.setdefault(key, []).append((rec, t))
    out = {}
    for key, members in groups.items():
        out[key] = {w: [torch.stack([rec[w][l][:, t, :].double() for rec, t in members]).mean(0).float()
                        for l in range(L)] for w in ("k", "v", "z")}
    return out


def mean_cache(table, keys, L):
    """A donor cache (run_prompt's format) whose position t holds the mean of its key."""
    return {w: [torch.stack([table[key][w][l] for key in keys], dim=1).contiguous() for l in range(L)]
            for w in ("k", "v", "z")}


def main_mean():
    """--mean: mean_plans.json, <model>.mean.safetensors (the mean table's layer 0, and the last position's
    logits and the greedy generation of every MEAN_PLANS plan on the main fixture's prompts) and
    mean_checks.txt."""
    lines, log, check = check_log()
    with open(os.path.join(OUT, "mean_plans.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(MEAN_PLANS, indent=1) + "\n")
    pairs = prompt_pairs([AutoTokenizer.from_pretrained(os.path.join(MODELS_DIR, n)) for n in MODELS])
    for mi, name in enumerate(MODELS):
        folder = os.path.join(MODELS_DIR, name)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()
        tok = AutoTokenizer.from_pretrained(folder)
        c = model.config
        L, H, V = c.num_hidden_layers, c.num_attention_heads, c.vocab_size
        install(model)
        main_file = load_file(os.path.join(OUT, name + ".safetensors"))
        prompts, recs, keyss = [], [], []
        for pi, pp in enumerate(pairs):
            toks, typ, idx = build_prompt(tok, pp)
            donors = make_donors(tok, V, toks, typ, seed=1000 * mi + 10 * pi + 7)
            check(main_file[f"prompt{pi}.tokens"].tolist() == toks and main_file[f"prompt{pi}.donors"].tolist() == donors,
                  f"{name} prompt{pi}: the prompts differ from {name}.safetensors'")
            _, rec = run_prompt(model, toks)
            prompts.append((toks, typ, idx, donors))
            recs.append(rec)
            keyss.append(span_keys(typ, idx))
        table = mean_table(recs, keyss, L)
        keys = sorted(table)
        tensors = {"mean.keys": torch.tensor(keys, dtype=torch.int32),
                   "mean.count": torch.tensor([sum(k == key for ks in keyss for k in ks) for key in keys], dtype=torch.int32)}
        for w in ("k", "v", "z"):
            tensors[f"mean.layer0.{w}"] = torch.stack([table[key][w][0] for key in keys]).contiguous()
        shared = sum(1 for key in keys if int(tensors["mean.count"][keys.index(key)]) > 1)
        log(f"{name}: {len(keys)} groups (type, index, offset), {shared} shared by more than one position")
        for pi, (toks, typ, idx, donors) in enumerate(prompts):
            clean_hf = hf_logits(model, toks)
            mean0 = mean_cache(table, keyss[pi], L)
            # self-check: a prompt's own positions whose group is theirs alone get exactly their clean k
            for l in range(L):
                for t, key in enumerate(keyss[pi]):
                    if int(tensors["mean.count"][keys.index(key)]) == 1:
                        check(torch.allclose(mean0["k"][l][:, t], recs[pi]["k"][l][:, t], atol=1e-6),
                              f"{name} prompt{pi}: a group of one position is not that position's key")
            for pj, plan in enumerate(MEAN_PLANS):
                em = compile_edges(plan, typ, idx, L, H)
                hu = compile_heads(plan, typ, L, H)
                em0, hu0 = restrict_to_donor0(em, hu)
                caches = [mean0]
                if any(int(e.max()) >= 1 for e in em) or any(x[2] >= 1 for units in hu for x in units):
                    _, rec1 = run_prompt(model, donors[1], em0, hu0, [mean0])
                    caches.append(rec1)
                logits, gen, _ = generate(model, toks, em, hu, caches)
                tensors[f"plan{pj}.prompt{pi}.last_logits"] = logits[-1].contiguous()
                tensors[f"plan{pj}.prompt{pi}.generated"] = torch.tensor(gen, dtype=torch.int32)
                d_clean = maxdiff(logits, clean_hf)
                check(d_clean > 1e-3, f"{name} prompt{pi} plan {plan['name']} changes nothing")
                log(f"  plan{pj} {plan['name']:<18} prompt{pi} max|logits - clean| {d_clean:.4g}  gen {gen}")
        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
                "model": name, "plans": json.dumps([p["name"] for p in MEAN_PLANS]), "n_prompts": str(len(pairs)),
                "n_generated": str(N_GEN)}
        save_safetensors_stable(tensors, os.path.join(OUT, name + ".mean.safetensors"), meta)
    with open(os.path.join(OUT, "mean_checks.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    log("all checks passed")


if __name__ == "__main__":
    if sys.argv[1:] == ["--interventions"]:
        main_interventions()
    elif sys.argv[1:] == ["--mean"]:
        main_mean()
    else:
        main()
