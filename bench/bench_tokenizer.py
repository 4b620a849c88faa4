#!/usr/bin/env python3
"""HF tokenizers side of bench_tokenizer.sh: same text, same paragraphs, single-threaded encode calls.
usage: bench_tokenizer.py TOKENIZER_DIR TEXT_FILE [MIN_SECONDS]"""
import gzip
import json
import os
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
import tokenizers  # noqa: E402


def main():
    d, path = sys.argv[1], sys.argv[2]
    min_s = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    p = os.path.join(d, "tokenizer.json")
    raw = open(p, "rb").read() if os.path.exists(p) else gzip.open(p + ".gz").read()
    j = json.loads(raw)
    merges = j["model"]["merges"]
    if merges and isinstance(merges[0], list):  # tokenizers 0.19 reads only "a b" merges
        j["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    tok = tokenizers.Tokenizer.from_str(json.dumps(j))
    data = open(path, "rb").read()
    text = data.decode("utf-8")
    paragraphs = []
    pos = 0
    while pos < len(text):
        q = text.find("\n\n", pos)
        q = len(text) if q < 0 else q + 2
        paragraphs.append(text[pos:q])
        pos = q
    passes, nbytes, t0 = 0, 0, time.perf_counter()
    while True:
        tokens = 0
        for para in paragraphs:
            tokens += len(tok.encode(para, add_special_tokens=False).ids)
        nbytes += len(data)
        passes += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            break
    print(f"hf {nbytes / elapsed / 1e6:.2f} MB/s {tokens} tokens {len(data)} bytes {passes} passes")


if __name__ == "__main__":
    main()
