#!/usr/bin/env python3
"""Generates the tokenizer parity fixtures: tests/fixtures/tokenizers/<name>/parity.jsonl.gz.

Pinned reference: tokenizers==0.19.1 (HF Rust tokenizers via its Python binding; the project venv also
has transformers 4.44.2, unused here). Run with the project venv:

    /work/venv/bin/python tools/gen_tokenizer_fixtures.py            # all tokenizers
    /work/venv/bin/python tools/gen_tokenizer_fixtures.py gpt2 phi-2 # some

Each line of parity.jsonl.gz is one case:
  {"text": str, "ids": [...]}                   ids = encode(text, add_special_tokens=False)
  + "special": [...]                            encode(text, add_special_tokens=True), for prompt cases
  + "decoded": str                              decode(ids, skip_special_tokens=False), only where it != text
  {"bytes": hex, "ids": [...], "decoded": ...}  invalid UTF-8: the C side gets these bytes; HF gets
                                                bytes.decode("utf-8", "replace"), the documented C behaviour.
Strings: (a) every item of every task pair list (datasets/pairs/*.json) alone, with a leading
space, with the ":" separator, and in 2- and 3-example "{x}: {y}\\n" prompts, and every word of
datasets/words once (alternately bare and after a space); (b) hard cases; (c) 3000
random strings from a seeded generator.
"""
import binascii
import glob
import gzip
import json
import os
import random
import sys

import tokenizers

PINNED = "0.19.1"
if tokenizers.__version__ != PINNED:
    sys.exit(f"tokenizers {tokenizers.__version__} found; the fixtures are pinned to {PINNED}")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tokenizers")
NAMES = ["gpt2", "phi-2", "llama-3", "llama-3.1", "gemma-2", "smollm"]
# Small tokenizers trained here on the task data, for pipeline components that no real file above uses
# (Prepend, Metaspace, Strip, Split behaviours, Digits, ByteLevel add_prefix_space, lstrip/rstrip/
# single_word/normalized added tokens, unk with fuse_unk). Written by this script, then checked like the rest.
SYNTHETIC = ["synthetic-llama2", "synthetic-metaspace", "synthetic-bytelevel"]
N_RANDOM = 3000


def load_tokenizer(name):
    with gzip.open(os.path.join(FIXTURES, name, "tokenizer.json.gz"), "rt", encoding="utf-8") as f:
        j = json.load(f)
    merges = j["model"]["merges"]
    if merges and isinstance(merges[0], list):
        # tokenizers 0.19 reads only "a b" merges; no piece contains a space, so this is lossless.
        assert not any(" " in a or " " in b for a, b in merges)
        j["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return tokenizers.Tokenizer.from_str(json.dumps(j))


def dataset_cases():
    """(text, with_special) for every dataset item in the prompt shapes the tasks use."""
    cases = []
    for path in sorted(glob.glob(os.path.join(ROOT, "datasets", "pairs", "*.json"))):
        with open(path, encoding="utf-8") as f:
            pairs = json.load(f)
        n = len(pairs)
        for i, p in enumerate(pairs):
            x, y = p["input"], p["output"]
            for s in (x, " " + x, x + ":", y, " " + y, f"{x}: {y}\n"):
                cases.append((s, False))
            k = 2 + (i % 2)  # 2- and 3-example prompts, the query last
            shots = [pairs[(i + 1 + j) % n] for j in range(k)]
            prompt = "".join(f"{e['input']}: {e['output']}\n" for e in shots) + f"{x}:"
            cases.append((prompt, True))
            cases.append((prompt + " " + y, True))
    with open(os.path.join(ROOT, "datasets", "words", "american-english-small"), encoding="utf-8") as f:
        words = [w.rstrip("\n") for w in f if w.strip()]
    # Each word once, alternately as it starts a line and as it follows ": " (keeps the fixture small).
    for i, w in enumerate(words):
        cases.append((w if i % 2 else " " + w, False))
    return cases


HARD = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", " \n", "\n ", "\r\n", "\r", " \t \n ", "a\tb", "\t\tx",
    "Hello world", " Hello world", "Hello  world", "Hello   world ", "  leading", "trailing  ", "x \n\n y",
    "end.\n", "a\n\nb\n\n\nc", "    indented code\n        more", "tab\tseparated\tvalues\n",
    "0", "7", "12", "123", "1234", "12345", "123456789012345", "3.14159", "1,000,000", "2024-11-27", "v1.2.3",
    "room 101 at 3:45pm", "x=42;y=-7", "٣٤٥", "１２３", "½ ¼ ⅓", "Ⅻ",
    "don't", "I'm", "you're", "we've", "they'll", "he'd", "it's", "IT'S", "DON'T", "I'M", "o'clock",
    "rock 'n' roll", "''", "'s", " 's", "'S'", "'ll've",
    "café", "cafe\u0301", "naïve", "résumé", "Ångström", "Åland", "e\u0301\u0301", "\u0301", "a\u0308\u0304",
    "Zürich", "São Paulo", "Łódź", "İstanbul", "ß", "ǅ", "ﬁ", "Ελληνικά", "русский язык", "עברית", "العربية",
    "हिन्दी", "ภาษาไทย", "한국어", "日本語のテキスト", "中文字符", "漢字かなカナ", "你好，世界！", "。、「」",
    "😀", "😀😀", " 😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤖 robot", "a😀b", "\U0001F9D1\u200D\U0001F4BB",
    "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<bos>Hello", "Hello<bos>", " <bos> ", "<bos><bos>", "<<bos>>",
    "<start_of_turn>user\nHi<end_of_turn>\n", "<|endoftext|>", "a<|endoftext|>b", " <|endoftext|> ",
    "<|begin_of_text|>", "<|begin_of_text|>Hi", "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "<|im_start|>", "<|endoftext", "endoftext|>", "<|reserved_special_token_5|>",
    "<h1>Title</h1>", "<div class=\"x\">", "<table><tr><td>1</td></tr></table>", "</p>", "<br>", "<a href='u'>",
    "[toxicity=0]", "<unused0>", "<unused99>", "<start_of_image>", "<0x41>", "<0xFF>",
    "▁", "▁▁", "▁Hello", "Hello▁world", "▁▁▁▁", " ▁ ", "\u2581\u2581 \u2581",
    "\u00a0", "a\u00a0b", "\u2009thin", "\u3000ideographic", "\u200b", "zero\u200bwidth", "\u0085", "line\u2028sep",
    "\u180e", "\ufeffbom", "\u200d", "\u00ad", "\x00", "a\x00b", "\x7f", "\x1b[31mred\x1b[0m", "\x0b\x0c",
    "\ufffd", "\uffff", "\U0010FFFF", "\U0001D400\U0001D401", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U00020000",
    "The capital of France is", "The capital of France is Paris.", "France:", " Paris\n", "Kabul\nAlbania:",
    "Afghanistan: Kabul\nAlbania: Tirana\nFrance:", "x" * 300, " " * 40, "\n" * 40, "\t" * 10, "ab" * 100,
    "a" + " " * 33 + "b", "1" * 50, "!!!???...", "....", "---", "===", "```python\nprint('hi')\n```",
    "def f(x):\n    return x  # comment\n", "{\"json\": [1, 2, 3]}", "http://example.com/a?b=c&d=e",
    "user@example.com", "#hashtag @mention $100 %20 ^_^ ~~ `code`", "C++ && C# || F#", "α+β=γ", "∀x∈ℝ: x²≥0",
    # added-token flags (the synthetic tokenizers carry lstrip <mask>, rstrip [SEP], both <cls>, single_word hello)
    "a <mask> b", "a  <mask>", "<mask>", " \t<mask>x", "<mask><mask>", " <mask> <mask> ", "x [SEP]  y", "[SEP]\n\n",
    "[SEP][SEP]  ", "  <cls>  z", "<cls>", "a<cls>b", "hello world", "say hello", "shello", "hello_", "hellos",
    "hello", " hello ", "(hello)", "héllo hello", "hello\u200dx", "1hello", "world", " world", "  world", "a-b-c",
    "x,y;z", "CamelCaseWord", "!!!wow!!", "9-8-7", "a\t\tb",
]

INVALID = [
    b"\xff", b"\xfe\xff", b"abc\x80def", b"\x80", b"\xbf\xbf", b"\xc0\xaf", b"\xc2", b"\xc2 x", b"\xe2\x82",
    b"\xe2\x82 euro", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf0\x9f\x98", b"\xf0\x9f\x98 x",
    b"\xf4\x90\x80\x80", b"\xf5\x80", b"\xf8\x88\x80\x80\x80", b"Hello \xe9t\xe9", b"<bos>\xff<bos>",
    b"\xe2\x96\xe2\x96\x81", b"caf\xc3", b"\xc3\xa9\xc3", b"\x00\xff\x00", b" \xff ", b"12\xff34",
]


def random_strings(n, seed=20241127):
    rng = random.Random(seed)
    pools = [
        lambda: rng.choice(["the", "The", "cat", "Paris", "hello", "WORLD", "x", "I", "a", "don", "ing", "tion"]),
        lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(1, 9))),
        lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 8))),
        lambda: rng.choice([" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\u00a0", "\u3000", "\u2009"]),
        lambda: rng.choice(list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")) * rng.randint(1, 3),
        lambda: rng.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "n't"]),
        lambda: "".join(rng.choice("áéíóúàèìòùâêîôûäëïöüñçøåæœßğışžčřł") for _ in range(rng.randint(1, 4))),
        lambda: rng.choice("aeiouAEOnc") + "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(1, 3))),
        lambda: "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(1, 5))),
        lambda: "".join(chr(rng.randint(0x3041, 0x3096)) for _ in range(rng.randint(1, 5))),
        lambda: "".join(chr(rng.randint(0x0410, 0x044F)) for _ in range(rng.randint(1, 7))),
        lambda: "".join(chr(rng.randint(0x03B1, 0x03C9)) for _ in range(rng.randint(1, 6))),
        lambda: "".join(chr(rng.randint(0x0627, 0x064A)) for _ in range(rng.randint(1, 6))),
        lambda: "".join(chr(rng.randint(0x0905, 0x0939)) for _ in range(rng.randint(1, 4))),
        lambda: "".join(chr(rng.randint(0xAC00, 0xD7A3)) for _ in range(rng.randint(1, 4))),
        lambda: "".join(chr(rng.randint(0x1F600, 0x1F64F)) for _ in range(rng.randint(1, 3))),
        lambda: rng.choice(["👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "✨", "🚀", "\u200d", "\ufe0f"]),
        lambda: rng.choice(["<bos>", "<eos>", "<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<start_of_turn>",
                            "<h1>", "</div>", "▁", "▁▁", "<0x41>", "<unk>", "[toxicity=0]", "<|eot_id|>",
                            "<mask>", "[SEP]", "<cls>", "hello", " hello ", "<s>", "</s>"]),
        lambda: "".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x24F), rng.randint(0x370, 0x3FF),
                                         rng.randint(0x2000, 0x206F), rng.randint(0x2100, 0x27BF), rng.randint(0xFF01, 0xFF5E)]))
                        for _ in range(rng.randint(1, 6))),
        lambda: "".join(chr(rng.randint(0x21, 0x7E)) for _ in range(rng.randint(1, 12))),
    ]
    out = []
    for _ in range(n):
        parts = [rng.choice(pools)() for _ in range(rng.randint(1, 14))]
        out.append("".join(parts))
    return out


def generate(name, cases):
    tok = load_tokenizer(name)
    path = os.path.join(FIXTURES, name, "parity.jsonl.gz")
    n_decoded = 0
    with gzip.GzipFile(path, "wb", mtime=0, compresslevel=9) as f:
        for text, special in cases:
            rec = {}
            if isinstance(text, bytes):
                rec["bytes"] = binascii.hexlify(text).decode()
                text = text.decode("utf-8", "replace")
            else:
                rec["text"] = text
            rec["ids"] = tok.encode(text, add_special_tokens=False).ids
            if special:
                rec["special"] = tok.encode(text, add_special_tokens=True).ids
            decoded = tok.decode(rec["ids"], skip_special_tokens=False)
            if decoded != rec.get("text"):
                rec["decoded"] = decoded
                n_decoded += "text" in rec
            f.write((json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
    print(f"{name}: {len(cases)} cases, {n_decoded} do not round-trip in HF, {os.path.getsize(path)} bytes -> {path}")


def training_corpus():
    text = []
    for path in sorted(glob.glob(os.path.join(ROOT, "datasets", "pairs", "*.json"))):
        with open(path, encoding="utf-8") as f:
            text += [f"{p['input']}: {p['output']}" for p in json.load(f)]
    with open(os.path.join(ROOT, "datasets", "words", "american-english-small"), encoding="utf-8") as f:
        text += [w.strip() for w in f][::5]
    return text + ["The capital of France is Paris.", "don't 12345 café", "hello world, hello; world-wide"]


def added(content, id, special=False, lstrip=False, rstrip=False, single_word=False, normalized=False):
    return {"id": id, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": normalized, "special": special}


def make_synthetic(name):
    from tokenizers import models, pre_tokenizers, trainers
    bytelevel = name == "synthetic-bytelevel"
    specials = ["<s>", "</s>", "<unk>"]
    if bytelevel:
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=name == "synthetic-llama2", fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)],
                                      show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    n = len(vocab)
    for extra in ["[SEP]", "<mask>", "<cls>", "hello", "\u2581world", "ĠParis"]:
        vocab.setdefault(extra, len(vocab))
    j["added_tokens"] = [added(t, i, special=True) for i, t in enumerate(specials)] + [
        added("<mask>", vocab["<mask>"], lstrip=True),
        added("[SEP]", vocab["[SEP]"], rstrip=True),
        added("<cls>", vocab["<cls>"], lstrip=True, rstrip=True, special=True),
        added("hello", vocab["hello"], single_word=True),
    ]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    seq = {"Sequence": {"id": "A", "type_id": 0}}
    template = {"type": "TemplateProcessing", "single": [bos, seq], "pair": [bos, seq, seq],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}}
    if name == "synthetic-llama2":
        # Llama-2 / Mistral style: Prepend + Replace normalizer, no pre-tokenizer, byte fallback, Strip decoder.
        j["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        j["pre_tokenizer"] = None
        j["added_tokens"].append(added("\u2581world", vocab["\u2581world"], normalized=True))
        j["post_processor"] = template
        j["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    elif name == "synthetic-metaspace":
        j["normalizer"] = {"type": "Replace", "pattern": {"Regex": "[\\t]+"}, "content": " "}
        j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"String": "-"}, "behavior": "MergedWithNext", "invert": False},
            {"type": "Split", "pattern": {"Regex": "[,;]"}, "behavior": "Removed", "invert": False},
            {"type": "Split", "pattern": {"Regex": "\\p{Lu}"}, "behavior": "MergedWithPrevious", "invert": False},
            {"type": "Split", "pattern": {"Regex": "[aeiou]+"}, "behavior": "Isolated", "invert": True},
            {"type": "Split", "pattern": {"Regex": "!"}, "behavior": "Contiguous", "invert": False},
            {"type": "Digits", "individual_digits": False},
            {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}]}
        j["post_processor"] = {"type": "Sequence", "processors": [template]}
        j["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}
    else:
        j["normalizer"] = None
        j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": False},
            {"type": "Split", "pattern": {"String": "|"}, "behavior": "Removed", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
        j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
        j["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    d = os.path.join(FIXTURES, name)
    os.makedirs(d, exist_ok=True)
    with gzip.GzipFile(os.path.join(d, "tokenizer.json.gz"), "wb", mtime=0, compresslevel=9) as f:
        f.write(json.dumps(j, ensure_ascii=False, indent=1).encode("utf-8"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}, f, indent=2)
        f.write("\n")
    print(f"{name}: trained {n} pieces")


def main():
    names = sys.argv[1:] or NAMES + SYNTHETIC
    cases = dataset_cases() + [(s, True) for s in HARD] + [(b, False) for b in INVALID]
    randoms = [(s, False) for s in random_strings(N_RANDOM)]
    short = dataset_cases()[:3000:3] + [(s, True) for s in HARD] + [(b, False) for b in INVALID] + randoms
    for name in names:
        if name in SYNTHETIC:
            make_synthetic(name)
            generate(name, short)
        else:
            generate(name, cases + randoms)


if __name__ == "__main__":
    main()
