#!/usr/bin/env python3
"""Independent Python reference for the patch stage's metrics at `last`: KL(full || patched) of the
next-token distribution, and per layer and query head the entropy of the attention row of `last` and its
mass on each sender token type (bos, x, t, y, n, query, last).

Needs the fixture venv of tools/make_venv.sh (the versions make_patch_fixtures.py asserts):

    /work/venv/bin/python tools/make_metrics_fixtures.py

Reuses tools/make_patch_fixtures.py (its prompts, donors, plans and its patched copy of HF's eager
attention, which records each prompt pass's attention probabilities) and writes (replacing)
tests/fixtures/metrics/metrics.safetensors: for every model M of tests/fixtures/models/*-tiny, plan j of
tests/fixtures/patch/plans.json and prompt i of tests/fixtures/patch/M.safetensors,
    M.plan<j>.prompt<i>.kl            float32 [1]          KL(full || plan j) at the last position, nats
    M.plan<j>.prompt<i>.attn_entropy  float32 [L, H]       -sum_A p(last -> A) ln p(last -> A)
    M.plan<j>.prompt<i>.attn_mass     float32 [L, H, 7]    sum of p(last -> A) over senders A of each type
computed here from torch: log_softmax in float64 of the fp32 logits, torch.special.entr of the attention
probabilities. Self-checks (printed, and the script fails if one does not hold): the full model's recorded
attention equals HF's own output_attentions=True weights of the unpatched model, masses sum to 1 per head,
and the empty plan has KL 0. Deterministic: running it twice gives byte-identical files.
"""
import os
import sys

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_patch_fixtures as mpf  # noqa: E402
from make_tiny_models import save_safetensors_stable  # noqa: E402

OUT = os.path.join(mpf.ROOT, "tests", "fixtures", "metrics")
N_TYPES = 7  # bos .. last


def kl_full(clean_last, patched_last):
    lp = torch.log_softmax(clean_last.double(), dim=-1)
    lq = torch.log_softmax(patched_last.double(), dim=-1)
    return float((lp.exp() * (lp - lq)).sum())


def last_row_stats(rec_p, typ, L, H):
    """entropy [L, H] and mass [L, H, 7] of the last query row of each layer's probabilities [H, T, T]."""
    typ = torch.tensor(typ)
    ent = torch.zeros(L, H, dtype=torch.float64)
    mass = torch.zeros(L, H, N_TYPES, dtype=torch.float64)
    for l in range(L):
        p = rec_p[l][:, -1, :].double()  # [H, T]
        ent[l] = torch.special.entr(p).sum(-1)
        for t in range(N_TYPES):
            mass[l, :, t] = p[:, typ == t].sum(-1)
    return ent, mass


def main():
    os.makedirs(OUT, exist_ok=True)
    import json
    with open(os.path.join(mpf.ROOT, "tests", "fixtures", "patch", "plans.json"), encoding="utf-8") as f:
        plans = json.load(f)
    assert [p["name"] for p in plans] == [p["name"] for p in mpf.PLANS]
    tensors = {}
    for name in mpf.MODELS:
        folder = os.path.join(mpf.MODELS_DIR, name)
        model = mpf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()
        c = model.config
        L, H = c.num_hidden_layers, c.num_attention_heads
        mpf.install(model)
        fx = safe_open(os.path.join(mpf.ROOT, "tests", "fixtures", "patch", name + ".safetensors"), "pt")
        n_prompts = int(fx.metadata()["n_prompts"])
        worst_hf = 0.0
        for pi in range(n_prompts):
            toks = fx.get_tensor(f"prompt{pi}.tokens").tolist()
            typ = fx.get_tensor(f"prompt{pi}.types").tolist()
            idx = fx.get_tensor(f"prompt{pi}.index").tolist()
            donors = fx.get_tensor(f"prompt{pi}.donors").tolist()
            assert typ[-1] == mpf.TYPE_CODES["last"]
            # HF's own attention weights of the unpatched model (eager, output_attentions)
            with torch.no_grad():
                hf = model(input_ids=torch.tensor([toks]), use_cache=False, output_attentions=True)
            hf_att = [a[0].float() for a in hf.attentions]
            _, donor0_rec = mpf.run_prompt(model, donors[0])
            clean_last = None
            for pj, plan in enumerate(plans):
                em = mpf.compile_edges(plan, typ, idx, L, H)
                hu = mpf.compile_heads(plan, typ, L, H)
                caches = mpf.donor_caches(model, em, hu, donors, clean0=donor0_rec)
                mpf.ST.rec_p = {}
                logits, _ = mpf.run_prompt(model, toks, em, hu, caches)
                rec_p = dict(mpf.ST.rec_p)
                if plan["name"] == "clean":
                    clean_last = logits[-1]
                    for l in range(L):
                        worst_hf = max(worst_hf, float((rec_p[l] - hf_att[l]).abs().max()))
                    # rerun of the clean logits vs HF's unpatched logits: same model
                    assert float((logits[-1] - hf.logits[0, -1].float()).abs().max()) < 1e-5
                kl = kl_full(clean_last, logits[-1])
                ent, mass = last_row_stats(rec_p, typ, L, H)
                assert float((mass.sum(-1) - 1).abs().max()) < 1e-6
                if plan["name"] == "clean":
                    assert kl == 0.0, kl
                key = f"{name}.plan{pj}.prompt{pi}"
                tensors[key + ".kl"] = torch.tensor([kl], dtype=torch.float32)
                tensors[key + ".attn_entropy"] = ent.float().contiguous()
                tensors[key + ".attn_mass"] = mass.float().contiguous()
                print(f"{key} {plan['name']:<22} kl {kl:.6g}  mean entropy {float(ent.mean()):.5f}")
        print(f"{name}: recorded clean attention vs HF output_attentions: max |diff| {worst_hf:.3g}")
        assert worst_hf < 1e-5, worst_hf
    meta = {"transformers": mpf.transformers.__version__, "torch": torch.__version__, "models": ",".join(mpf.MODELS),
            "types": "bos,x,t,y,n,query,last", "kl": "KL(full || plan) at the last position, nats"}
    save_safetensors_stable(tensors, os.path.join(OUT, "metrics.safetensors"), meta)
    print("all checks passed")


if __name__ == "__main__":
    main()
