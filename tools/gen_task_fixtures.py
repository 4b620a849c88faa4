#!/usr/bin/env python3
"""Brute-force reference for the clean-tokenization filter (stages/prompts.h), computed with HF tokenizers.

For every real tokenizer under tests/fixtures/tokenizers/ and every task in datasets/tasks/, decides for
each pair whether it tokenizes cleanly, applying the filter's definition directly with HF `tokenizers`:
X = enc(x), Y = enc(prefix + y), T = enc(sep), N = enc(nl), without special tokens, and in this order
  empty:   X or Y empty
  x+t:     enc(x + sep) == X + T
  t+y:     enc(sep + prefix + y) == T + Y
  y+n:     enc(prefix + y + nl) == Y + N
  n+x:     enc(nl + x) == N + X
  context: enc(nl + x + sep + prefix + y + nl) == N + X + T + Y + N
The first failing test is the reason (codes 1..6; 0 = clean). Writes tests/fixtures/tasks/filter.json.gz.

Run with the pinned venv (tools/make_venv.sh): .venv/bin/python tools/gen_task_fixtures.py
Pinned: tokenizers 0.19.1.
"""
import gzip
import json
import os
import sys

import tokenizers

assert tokenizers.__version__ == "0.19.1", tokenizers.__version__
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real tokenizers (few pairs fail their filter) and the tiny models' small trained ones (many do).
TOKENIZERS = {
    "gemma-2": "tests/fixtures/tokenizers/gemma-2/tokenizer.json.gz",
    "llama-3": "tests/fixtures/tokenizers/llama-3/tokenizer.json.gz",
    "phi-2": "tests/fixtures/tokenizers/phi-2/tokenizer.json.gz",
    "gemma2-tiny": "tests/fixtures/models/gemma2-tiny/tokenizer.json",
    "llama3-tiny": "tests/fixtures/models/llama3-tiny/tokenizer.json",
    "phi2-tiny": "tests/fixtures/models/phi2-tiny/tokenizer.json",
    "smollm-tiny": "tests/fixtures/models/smollm-tiny/tokenizer.json",
}


def load_tokenizer(name):
    path = os.path.join(ROOT, TOKENIZERS[name])
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return tokenizers.Tokenizer.from_str(f.read())


def load_pairs(path, in_key, out_key, want_identity):
    out = []
    for item in json.load(open(path, encoding="utf-8")):
        if "suspect" in item:
            continue
        x, y = item[in_key], item[out_key]
        if want_identity is not None and (x == y) != want_identity:
            continue
        out.append((x, y))
    return out


def load_task(path):
    t = json.load(open(path, encoding="utf-8"))
    d = os.path.dirname(path)
    in_key, out_key = t.get("input", "input"), t.get("output", "output")
    amb = t.get("ambiguous_pairs")
    pairs = load_pairs(os.path.join(d, t["pairs"]), in_key, out_key, False if amb else None)
    ambiguous = load_pairs(os.path.join(d, amb), in_key, out_key, True) if amb else []
    return t, pairs, ambiguous


def reason(tok, x, y, sep, prefix, nl):
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    X, Y, T, N = enc(x), enc(prefix + y), enc(sep), enc(nl)
    if not X or not Y:
        return 1
    tests = [
        (x + sep, X + T),
        (sep + prefix + y, T + Y),
        (prefix + y + nl, Y + N),
        (nl + x, N + X),
        (nl + x + sep + prefix + y + nl, N + X + T + Y + N),
    ]
    for code, (text, want) in enumerate(tests, start=2):
        if enc(text) != want:
            return code
    return 0


def main():
    task_dir = os.path.join(ROOT, "datasets/tasks")
    out = {"tokenizers_version": tokenizers.__version__, "paths": TOKENIZERS, "results": {}}
    for name in TOKENIZERS:
        tok = load_tokenizer(name)
        out["results"][name] = {}
        for fname in sorted(os.listdir(task_dir)):
            t, pairs, ambiguous = load_task(os.path.join(task_dir, fname))
            sep, prefix, nl = t.get("separator", ":"), t.get("output_prefix", " "), t.get("example_separator", "\n")
            res = {
                "pairs": [reason(tok, x, y, sep, prefix, nl) for x, y in pairs],
                "ambiguous": [reason(tok, x, y, sep, prefix, nl) for x, y in ambiguous],
            }
            out["results"][name][t["name"]] = res
            kept = res["pairs"].count(0)
            print(f"{name:8s} {t['name']:24s} {kept}/{len(pairs)} kept", file=sys.stderr)
    path = os.path.join(ROOT, "tests/fixtures/tasks/filter.json.gz")
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(json.dumps(out, sort_keys=True).encode())


if __name__ == "__main__":
    main()
