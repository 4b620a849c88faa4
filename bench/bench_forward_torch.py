"""The torch side of bench_forward: HF transformers LlamaForCausalLM in fp32, eager attention, on the
same token ids (same formula as bench_forward.c) and the same thread count. B prompts of T tokens run
as one batch (all the same length, so no padding), logits only at the last position, one warm-up then
R timed passes; prints tokens/s.

    python bench_forward_torch.py --model DIR [--batch 16] [--len 100] [--reps 3] [--threads N]
"""
import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM


def bench_id(s, t, T, vocab):
    x = ((s * T + t) * 2654435761) % (1 << 32)
    return 1 + x % (vocab - 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--len", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    V = model.config.vocab_size
    B, T = a.batch, a.len
    ids = torch.tensor([[bench_id(s, t, T, V) for t in range(T)] for s in range(B)], dtype=torch.long)
    total = 0.0
    with torch.inference_mode():
        for rep in range(a.reps + 1):
            t0 = time.perf_counter()
            # The pipeline projects only the last position; so does this (the base model runs on all
            # positions, the LM head on the last one only).
            hidden = model.model(input_ids=ids, use_cache=True).last_hidden_state[:, -1, :]
            logits = model.lm_head(hidden)
            dt = time.perf_counter() - t0
            if rep > 0:
                total += dt
            print(f"  {'timed' if rep else 'warm-up'} pass {rep}: {dt:.3f} s", flush=True)
    print("argmax of the first prompts:", " ".join(str(int(i)) for i in logits[:4].argmax(-1)))
    print(f"engine=torch batch={B} len={T} reps={a.reps} threads={torch.get_num_threads()} "
          f"seconds={total / a.reps:.4f} tokens_per_s={B * T * a.reps / total:.1f}")


if __name__ == "__main__":
    main()
