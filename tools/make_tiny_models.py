#!/usr/bin/env python3
"""Build the tiny random-weight test models and their HuggingFace reference outputs.

Needs the fixture venv made by tools/make_venv.sh (torch 2.4.1 CPU, transformers 4.44.2,
tokenizers 0.19.1, safetensors 0.4.5, numpy<2):

    tools/make_venv.sh .venv
    .venv/bin/python tools/make_tiny_models.py

Writes (replacing what is there):
    tests/fixtures/models/<variant>/     HF checkpoint folders (config.json, safetensors, tokenizer)
    tests/fixtures/reference/<variant>.safetensors   HF reference activations per prompt

Everything is seeded and runs on CPU in float32; see tests/fixtures/models/README.md for the layout.
Reads only files inside the repository (datasets/), never anything outside it.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch

import tokenizers
import transformers
import safetensors
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM,
                          LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM)
from transformers.cache_utils import DynamicCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
OUT_REF = os.path.join(ROOT, "tests", "fixtures", "reference")
DATA = os.path.join(ROOT, "datasets")
N_GEN = 8

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

# --------------------------------------------------------------------------------------------------
# Task data: tokenizer training corpus and ICL prompts
# --------------------------------------------------------------------------------------------------
PAIR_FILES = ["country-capital", "present-past", "capitalize", "person-sport", "present_past_identity_verbs"]


def load_pairs(name):
    with open(os.path.join(DATA, "pairs", name + ".json"), encoding="utf-8") as f:
        return [(p["input"], p["output"]) for p in json.load(f)]


def training_texts():
    texts = []
    for name in PAIR_FILES:
        for a, b in load_pairs(name):
            texts.append(f"{a}: {b}\n")
    with open(os.path.join(DATA, "words", "american-english-small"), encoding="utf-8") as f:
        words = [w.strip() for w in f if w.strip()]
    # Words in lines of 8, so spaces between words are seen as in running text.
    for i in range(0, len(words), 8):
        texts.append(" ".join(words[i:i + 8]))
    return texts


PROMPT_SPECS = [("capitalize", 6), ("country-capital", 13), ("present-past", 25), ("person-sport", 40)]


def make_prompts(toks):
    """Four ICL prompts ("in: out\n" shots, then "query:"), the same texts for every model, chosen so that
    the longest encoding over the tiny tokenizers is close to 6, 13, 25, 40 tokens (BOS included)."""
    prompts = []
    for name, target in PROMPT_SPECS:
        pairs = load_pairs(name)
        perm = np.random.RandomState(1234 + target).permutation(len(pairs))
        best = None
        for k in range(0 if target <= 8 else 1, 12):
            for s0 in range(0, 60):
                sel = [pairs[j] for j in perm[s0:s0 + k + 1]]
                text = "".join(f"{a}: {b}\n" for a, b in sel[:k]) + f"{sel[k][0]}:"
                n = max(len(t(text)["input_ids"]) for t in toks)
                key = (abs(n - target), k, s0)
                if best is None or key < best[0]:
                    best = (key, text)
        prompts.append(best[1])
    return prompts


# --------------------------------------------------------------------------------------------------
# Tokenizers: real pipelines (copied from the real tokenizer.json files), vocabulary retrained small
# --------------------------------------------------------------------------------------------------
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _added(tid, content, special=True, normalized=False):
    return {"id": tid, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def _train_bpe(pre_tok, normalizer, vocab_size, special_tokens=(), byte_level=True):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tok
    kw = dict(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False, min_frequency=2)
    if byte_level:
        kw["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(training_texts(), trainer=trainers.BpeTrainer(**kw))
    j = json.loads(tok.to_str())
    assert len(j["model"]["vocab"]) == vocab_size, (len(j["model"]["vocab"]), vocab_size)
    return j["model"]["vocab"], j["model"]["merges"]


def _bpe_model(vocab, merges, **over):
    m = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
         "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
         "vocab": vocab, "merges": merges}
    m.update(over)
    return m


def _tokenizer_json(model, added, normalizer, pre_tok, post, decoder):
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tok, "post_processor": post, "decoder": decoder,
            "model": model}


def _pre_from_json(pre):
    return Tokenizer.from_str(json.dumps(_tokenizer_json(_bpe_model({}, []), [], None, pre, None, None))).pre_tokenizer


BYTELEVEL_PP = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
BYTELEVEL_DEC = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def tok_gemma2(V):
    """Gemma-2 pipeline: Replace ' '->'▁' normalizer, Split(' ') pre-tokenizer, BPE with byte_fallback
    (<0x00>..<0xFF> tokens), no dummy prefix, <bos> prepended by TemplateProcessing."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_toks = [f"<0x{b:02X}>" for b in range(256)]
    n_fixed = len(specials) + len(byte_toks)
    # Training-time pre-tokenizer keeps pieces word-sized (the real vocabulary comes from SentencePiece,
    # which does not merge across words); the saved pipeline is the real one.
    train_pre = pre_tokenizers.Split(Regex("▁?[^▁\n]+|\n+|▁+"), behavior="isolated")
    vocab_t, merges = _train_bpe(train_pre, normalizers.Replace(" ", "▁"), V - n_fixed, byte_level=False)
    vocab = {t: i for i, t in enumerate(specials + byte_toks)}
    for t, i in sorted(vocab_t.items(), key=lambda x: x[1]):
        assert t not in vocab
        vocab[t] = i + n_fixed
    model = _bpe_model(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    j = _tokenizer_json(
        model, [_added(i, t) for i, t in enumerate(specials)],
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}},
        {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                          {"type": "ByteFallback"}, {"type": "Fuse"}]})
    tk = Tokenizer.from_str(json.dumps(j))
    hf = transformers.GemmaTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                         unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
                                         add_eos_token=False)
    return hf, dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)


def tok_llama3(V):
    """Llama-3 pipeline: llama3 split regex + ByteLevel(use_regex=False), BPE ignore_merges,
    special tokens after the BPE vocabulary, <|begin_of_text|> via TemplateProcessing."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    nb = V - len(specials)
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    vocab, merges = _train_bpe(_pre_from_json(pre), None, nb)
    bos = nb
    j = _tokenizer_json(
        _bpe_model(vocab, merges, ignore_merges=True),
        [_added(nb + i, t) for i, t in enumerate(specials)], None, pre,
        {"type": "Sequence", "processors": [
            BYTELEVEL_PP,
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos],
                                                      "tokens": ["<|begin_of_text|>"]}}}]},
        BYTELEVEL_DEC)
    tk = Tokenizer.from_str(json.dumps(j))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                                              eos_token="<|end_of_text|>", clean_up_tokenization_spaces=True,
                                              model_input_names=["input_ids", "attention_mask"])
    # Llama-3 base: bos <|begin_of_text|>, eos <|end_of_text|>, no pad token.
    return hf, dict(bos_token_id=bos, eos_token_id=bos + 1, pad_token_id=None)


def tok_smollm(V):
    """SmolLM (v1) pipeline: Digits(individual) + GPT-2 ByteLevel pre-tokenizer, specials at 0..16,
    bos = eos = unk = <|endoftext|> = 0, no BOS added."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
                "<empty_output>"]
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    vocab, merges = _train_bpe(_pre_from_json(pre), None, V, special_tokens=specials)
    assert all(vocab[t] == i for i, t in enumerate(specials))
    j = _tokenizer_json(_bpe_model(vocab, merges, continuing_subword_prefix="", end_of_word_suffix=""),
                        [_added(i, t) for i, t in enumerate(specials)], None, pre, BYTELEVEL_PP, BYTELEVEL_DEC)
    tk = Tokenizer.from_str(json.dumps(j))
    hf = transformers.GPT2TokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", add_prefix_space=False,
                                        additional_special_tokens=specials, clean_up_tokenization_spaces=False)
    return hf, dict(bos_token_id=0, eos_token_id=0, pad_token_id=None)


def tok_phi2(V):
    """Phi-2 (= GPT-2/CodeGen) pipeline: ByteLevel(use_regex) pre-tokenizer, <|endoftext|> right after the
    BPE vocabulary (in the vocab and as special added token), then non-special added tokens for runs of
    spaces and tabs (longest first, as Phi-2 has 31..2 spaces and 9..2 tabs)."""
    extra = [" " * n for n in range(8, 1, -1)] + ["\t" * n for n in range(4, 1, -1)]
    nb = V - 1 - len(extra)
    pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    vocab, merges = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None, nb)
    eot = nb
    vocab["<|endoftext|>"] = eot
    added = [_added(eot, "<|endoftext|>")] + [_added(eot + 1 + i, t, special=False, normalized=True)
                                              for i, t in enumerate(extra)]
    j = _tokenizer_json(_bpe_model(vocab, merges, continuing_subword_prefix="", end_of_word_suffix=""),
                        added, None, pre, BYTELEVEL_PP, BYTELEVEL_DEC)
    tk = Tokenizer.from_str(json.dumps(j))
    hf = transformers.CodeGenTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                           eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                           add_prefix_space=False, clean_up_tokenization_spaces=True)
    return hf, dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=None)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def randomize_norms(model, seed, center):
    """Norm weights random (Gemma stores w with scale (1 + w): center 0; Llama/Phi scale w: center 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                if name.endswith("weight"):
                    p.copy_(center + 0.3 * torch.randn(p.shape, generator=g))
                else:  # LayerNorm bias
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_gemma2(V, tokcfg):
    cfg = Gemma2Config(
        vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, sliding_window=8, rope_theta=10000.0, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
        max_position_embeddings=256, initializer_range=0.3, attn_implementation="eager", **tokcfg)
    torch.manual_seed(101)
    m = Gemma2ForCausalLM(cfg)
    randomize_norms(m, 102, 0.0)
    return m


def build_llama3(V, tokcfg):
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 512},
        max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu",
        initializer_range=0.15, attention_bias=False, mlp_bias=False, **tokcfg)
    torch.manual_seed(201)
    m = LlamaForCausalLM(cfg)
    randomize_norms(m, 202, 1.0)
    return m


def build_smollm(V, tokcfg):
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
        rms_norm_eps=1e-5, hidden_act="silu", initializer_range=0.15, **tokcfg)
    torch.manual_seed(301)
    m = LlamaForCausalLM(cfg)
    randomize_norms(m, 302, 1.0)
    return m


def build_phi2(V, tokcfg):
    cfg = PhiConfig(
        vocab_size=V, hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, partial_rotary_factor=0.4, layer_norm_eps=1e-5, hidden_act="gelu_new",
        rope_theta=10000.0, qk_layernorm=False, tie_word_embeddings=False, max_position_embeddings=2048,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, initializer_range=0.15,
        attn_implementation="eager", **tokcfg)
    torch.manual_seed(401)
    m = PhiForCausalLM(cfg)
    randomize_norms(m, 402, 1.0)
    with torch.no_grad():  # biases are zero-initialised by HF; make them random so they matter
        g = torch.Generator().manual_seed(403)
        for name, p in sorted(m.named_parameters()):
            if name.endswith("bias") and "layernorm" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


MODELS = [  # name, vocab, tokenizer builder, model builder, extra variants
    ("gemma2-tiny", 768, tok_gemma2, build_gemma2, []),
    ("llama3-tiny", 640, tok_llama3, build_llama3, ["f16"]),
    ("smollm-tiny", 576, tok_smollm, build_smollm, ["sharded"]),
    ("phi2-tiny", 512, tok_phi2, build_phi2, []),
]


def save_variant(model, hf_tok, folder, dtype, max_shard_size="10GB"):
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    m = model.to(dtype)
    m.config.torch_dtype = dtype
    m.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    model.to(torch.float32)
    hf_tok.save_pretrained(folder)
    # Keep the folder minimal and stable: tokenizer.json + tokenizer_config.json (+ special_tokens_map.json)
    for extra in ["added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model"]:
        p = os.path.join(folder, extra)
        if os.path.exists(p):
            os.remove(p)


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------
def modeling_module(model):
    return sys.modules[type(model.model.layers[0].self_attn).__module__]


def capture_forward(model, ids):
    """One no-cache forward with hooks: logits, residual stream, post-RoPE q/k captured from
    apply_rotary_pos_emb, raw k/v projections."""
    mod = modeling_module(model)
    layers = model.model.layers
    L = len(layers)
    resid = [None] * (L + 1)
    rope_q, rope_k, proj_k, proj_v = [], [], [], []
    hooks = []

    def pre_hook(i):
        def f(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            resid[i] = hs.detach().clone()
        return f

    def post_hook(module, args, output):
        resid[L] = output[0].detach().clone()

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: proj_k.append(o.detach().clone())))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(lambda m, a, o: proj_v.append(o.detach().clone())))
    hooks.append(layers[-1].register_forward_hook(post_hook))
    orig = mod.apply_rotary_pos_emb

    def wrapped(q, k, cos, sin, *a, **kw):
        qo, ko = orig(q, k, cos, sin, *a, **kw)
        rope_q.append(qo.detach().clone())
        rope_k.append(ko.detach().clone())
        return qo, ko

    mod.apply_rotary_pos_emb = wrapped
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)
    finally:
        mod.apply_rotary_pos_emb = orig
        for h in hooks:
            h.remove()
    return out.logits[0].float(), torch.stack([r[0] for r in resid]), rope_q, rope_k, proj_k, proj_v


def cache_kv(model, ids):
    """k/v as stored by a DynamicCache after one prefill forward: [L, T, n_kv, hd] each, plus logits."""
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, past_key_values=cache)
    pkv = out.past_key_values
    if isinstance(pkv, tuple):
        ks = [kv[0] for kv in pkv]
        vs = [kv[1] for kv in pkv]
    else:
        ks, vs = pkv.key_cache, pkv.value_cache
    k = torch.stack([x[0].transpose(0, 1) for x in ks])
    v = torch.stack([x[0].transpose(0, 1) for x in vs])
    return k, v, out.logits[0]


def greedy_nocache(model, ids, n):
    """Greedy continuation with a full forward per step; returns tokens [n] and their logits [n, V]."""
    cur, steps = ids, []
    with torch.no_grad():
        for _ in range(n):
            last = model(input_ids=cur, use_cache=False).logits[0, -1]
            steps.append(last)
            cur = torch.cat([cur, last.argmax().view(1, 1)], dim=1)
    return cur[0, ids.shape[1]:], torch.stack(steps)


def greedy_generate(model, ids, n):
    """HF generate (its default cache: DynamicCache, HybridCache for Gemma2); tokens and raw step logits."""
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=pad, num_beams=1,
                             temperature=None, top_p=None, top_k=None, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:], torch.stack([x[0] for x in out.logits])


def softcap_check(model, rope_q, rope_k, T):
    cfg = model.config
    cap = cfg.attn_logit_softcapping
    scale = cfg.query_pre_attn_scalar ** -0.5
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    res = []
    i = torch.arange(T)
    for li, (q, k) in enumerate(zip(rope_q, rope_k)):
        s = torch.matmul(q, k.repeat_interleave(rep, dim=1).transpose(2, 3)) * scale
        ok = i[None, :] <= i[:, None]
        if li % 2 == 0:
            ok = ok & (i[:, None] - i[None, :] < cfg.sliding_window)
        s = s[0][:, ok]
        res.append((float(s.abs().max()), float((s.abs() > cap).float().mean())))
    return res


ST_DTYPES = {torch.float32: "F32", torch.int32: "I32"}


def save_safetensors_stable(tensors, path, metadata):
    """Write a safetensors file with a byte-stable header: safetensors' own writer keeps __metadata__ in a
    Rust HashMap, so its key order (and the file bytes) change from run to run. Here: __metadata__ first,
    then tensors sorted by name, keys sorted, data contiguous in that order, header padded with spaces to a
    multiple of 8 (as safetensors does). Checked by reading back with safetensors."""
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, off = [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        data = t.numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    hj = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(len(hj).to_bytes(8, "little"))
        f.write(hj)
        for b in blobs:
            f.write(b)
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safe_open(path, "pt") as f:
        assert f.metadata() == metadata


def reference_for_variant(name, folder, prompts, log):
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = model.config
    tensors = {}
    for pi, text in enumerate(prompts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        T = ids.shape[1]
        logits, resid, rq, rk, pk, pv = capture_forward(model, ids)
        k, v, logits_c = cache_kv(model, ids)
        L, nkv = cfg.num_hidden_layers, cfg.num_key_value_heads
        hd = k.shape[-1]
        # Cross-check the cache k/v against the apply_rotary_pos_emb capture and the projections.
        rk_s = torch.stack([x[0].transpose(0, 1) for x in rk])
        rd = rk_s.shape[-1]
        assert torch.equal(k[..., :rd], rk_s), "cache k != rotary capture"
        if rd < hd:
            kp = torch.stack([x[0].view(T, nkv, hd) for x in pk])
            assert torch.equal(k[..., rd:], kp[..., rd:]), "cache k pass-through != k_proj"
        vp = torch.stack([x[0].view(T, nkv, hd) for x in pv])
        assert torch.equal(v, vp), "cache v != v_proj"
        dlog = float((logits - logits_c).abs().max())
        assert dlog < 1e-4, dlog
        # Greedy continuation
        gen_nc, glog_nc = greedy_nocache(model, ids, N_GEN)
        gen_hf, glog_hf = greedy_generate(model, ids, N_GEN)
        agree = torch.equal(gen_nc, gen_hf)
        dgen = [float((a - b).abs().max()) for a, b in zip(glog_nc, glog_hf)]
        top2 = glog_nc.topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())  # greedy choices are not near-ties
        assert margin > 1e-4, margin
        log(f"  {name} prompt{pi}: T={T} generate==no-cache tokens: {agree}, step logits max|d| {max(dgen):.2e} "
            f"gen={gen_nc.tolist()} min top1-top2 margin {margin:.1e} cache-vs-nocache prefill logits max|d|={dlog:.2e}")
        if not agree or max(dgen) > 1e-4:
            log(f"  !!!!! LOUD NOTE: {name} prompt{pi} (T={T}): HF generate (its KV cache) disagrees with the "
                f"no-cache loop: tokens {gen_hf.tolist()} vs {gen_nc.tolist()}, per-step max|d logits| "
                f"{[round(d, 4) for d in dgen]}; the no-cache tokens and logits are stored !!!!!")
        if pi == len(prompts) - 1 and getattr(cfg, "attn_logit_softcapping", None):
            sc = softcap_check(model, rq, rk, T)
            log(f"  {name} prompt{pi}: attn softcap {cfg.attn_logit_softcapping}: per layer (max|score| before cap, "
                f"fraction of causal/window entries > cap) = " + ", ".join(f"({a:.2f}, {b:.3f})" for a, b in sc))
            # final logit softcap: recompute pre-cap logits from the last residual
            with torch.no_grad():
                pre = model.lm_head(model.model.norm(resid[L:L + 1]))[0]
            fc = cfg.final_logit_softcapping
            log(f"  {name} prompt{pi}: final softcap {fc}: max|logit| before cap {float(pre.abs().max()):.2f}, "
                f"fraction > cap {float((pre.abs() > fc).float().mean()):.3f}, after cap "
                f"max {float(logits.abs().max()):.3f}")
            assert torch.allclose(torch.tanh(pre / fc) * fc, logits, atol=1e-5)
        tensors[f"prompt{pi}.ids"] = ids[0].to(torch.int32).contiguous()
        tensors[f"prompt{pi}.logits"] = logits.contiguous()
        tensors[f"prompt{pi}.resid"] = resid.contiguous()
        tensors[f"prompt{pi}.k"] = k.contiguous()
        tensors[f"prompt{pi}.v"] = v.contiguous()
        tensors[f"prompt{pi}.generated"] = gen_nc.to(torch.int32).contiguous()
        tensors[f"prompt{pi}.gen_logits"] = glog_nc.float().contiguous()
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
            "variant": os.path.basename(folder), "n_prompts": str(len(prompts)), "n_generated": str(N_GEN)}
    for pi, text in enumerate(prompts):
        meta[f"prompt{pi}.text"] = text
    save_safetensors_stable(tensors, os.path.join(OUT_REF, os.path.basename(folder) + ".safetensors"), meta)


def gemma2_window_check(folder, prompts, log):
    """Show that the sliding window of the even layers changes the output exactly when T > window, and
    that HF's window is "key j visible from query i iff 0 <= i - j < sliding_window" (window 8 != 9)."""
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    W = model.config.sliding_window
    sliding = [i for i, layer in enumerate(model.model.layers) if layer.is_sliding]

    def run(ids, w):
        for i in sliding:
            model.model.layers[i].sliding_window = w
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits[0]

    log(f"  gemma2-tiny sliding layers {sliding}, window {W}")
    for pi, text in enumerate(prompts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        T = ids.shape[1]
        base = run(ids, W)
        d_inf = float((base - run(ids, 10 ** 6)).abs().max())
        d_next = float((base - run(ids, W + 1)).abs().max())
        log(f"  gemma2-tiny prompt{pi} T={T}: max|logits(window {W}) - logits(no window)| = {d_inf:.3e}, "
            f"vs window {W + 1}: {d_next:.3e}")
        assert (d_inf > 1e-4) == (T > W) and (d_next > 1e-4) == (T > W)


def tokenizer_check(folder, ids_ref, prompts):
    """tokenizer.json alone (tokenizers library, no transformers) gives the same ids as AutoTokenizer."""
    raw = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    for i, text in enumerate(prompts):
        assert raw.encode(text).ids == ids_ref[i], (folder, i)


def llama3_rope_check(model, log):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = model.config
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain, _ = ROPE_INIT_FUNCTIONS["default"](cfg, "cpu")
    used = model.model.rotary_emb.inv_freq
    assert torch.equal(used, scaled)
    ratio = (plain / scaled).tolist()
    changed = [not torch.equal(a, b) for a, b in zip(plain, scaled)]
    log(f"  llama3-tiny rope: unscaled inv_freq {plain.tolist()}")
    log(f"  llama3-tiny rope:   scaled inv_freq {scaled.tolist()}")
    log(f"  llama3-tiny rope: unscaled/scaled = {[round(r, 4) for r in ratio]}, changed = {changed}")
    assert any(changed) and not all(changed)


def main():
    os.makedirs(OUT_MODELS, exist_ok=True)
    if os.path.isdir(OUT_REF):
        shutil.rmtree(OUT_REF)
    os.makedirs(OUT_REF)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f"transformers {transformers.__version__} torch {torch.__version__} tokenizers {tokenizers.__version__}")
    toks = {name: tok_fn(V) for name, V, tok_fn, _, _ in MODELS}
    prompts = make_prompts([t for t, _ in toks.values()])
    for pi, p in enumerate(prompts):
        log(f"prompt{pi}: {p!r} lengths " + ", ".join(f"{n} {len(t(p)['input_ids'])}" for n, (t, _) in toks.items()))
    for name, V, tok_fn, build_fn, extras in MODELS:
        hf_tok, tokcfg = toks[name]
        assert len(hf_tok) == V, (name, len(hf_tok), V)
        model = build_fn(V, tokcfg)
        model.eval()
        c = model.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rd = int(getattr(c, "partial_rotary_factor", 1.0) * hd)
        log(f"{name}: vocab {c.vocab_size} L {c.num_hidden_layers} D {c.hidden_size} heads "
            f"{c.num_attention_heads} kv {c.num_key_value_heads} head_dim {hd} rotary_dim {rd} "
            f"ffn {c.intermediate_size} tied {c.tie_word_embeddings} bos/eos/pad {c.bos_token_id}/"
            f"{c.eos_token_id}/{c.pad_token_id}")
        if name == "llama3-tiny":
            llama3_rope_check(model, log)
        variants = [(name, torch.float32, "10GB"), (name + "-bf16", torch.bfloat16, "10GB")]
        if "f16" in extras:
            variants.append((name + "-f16", torch.float16, "10GB"))
        if "sharded" in extras:
            variants.append((name + "-sharded", torch.float32, "150KB"))
        for vname, dtype, shard in variants:
            folder = os.path.join(OUT_MODELS, vname)
            save_variant(model, hf_tok, folder, dtype, shard)
            reference_for_variant(vname, folder, prompts, log)
            ref = load_file(os.path.join(OUT_REF, vname + ".safetensors"))
            tokenizer_check(folder, [ref[f"prompt{i}.ids"].tolist() for i in range(len(prompts))], prompts)
        if name == "gemma2-tiny":
            gemma2_window_check(os.path.join(OUT_MODELS, name), prompts, log)
    with open(os.path.join(OUT_REF, "checks.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
