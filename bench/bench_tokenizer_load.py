#!/usr/bin/env python3
"""HF tokenizers side of bench_tokenizer_load.sh: Tokenizer.from_file on DIR/tokenizer.json, REPEATS times.
usage: bench_tokenizer_load.py TOKENIZER_DIR [REPEATS]
Prints "hf <best ms> ms best <median ms> ms median <vocab> vocab <repeats> repeats" (vocab: get_vocab_size
with added tokens), the line bench_tokenizer_load prints for the C side."""
import os
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
import tokenizers  # noqa: E402


def main():
    d = sys.argv[1]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    path = os.path.join(d, "tokenizer.json")
    times, vocab = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tok = tokenizers.Tokenizer.from_file(path)
        times.append((time.perf_counter() - t0) * 1e3)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        del tok
    times.sort()
    print(f"hf {times[0]:.1f} ms best {times[len(times) // 2]:.1f} ms median {vocab} vocab {repeats} repeats")


if __name__ == "__main__":
    main()
