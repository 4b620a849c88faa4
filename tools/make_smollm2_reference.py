#!/usr/bin/env python3
"""Reference logits for SmolLM2-135M-Instruct.Q4_1.gguf through a path independent of edgepatch's C code.

The GGUF is read with the `gguf` package (llama.cpp's own Python reader, pinned 0.19.0), every tensor is
dequantized with gguf.quants.dequantize, the llama.cpp names are mapped to HF names and the Q/K rows
un-permuted here in numpy, and the result is loaded into transformers 4.44.2's LlamaForCausalLM in fp32
(transformers 4.44.2 cannot load Q4_1 GGUF itself: its GGML_TYPES stop at Q4_0/Q8_0/K-quants). The prompts
are tokenized with `tokenizers` 0.19.1 from the tokenizer.json that tools/make_smollm_tokenizer.py builds
(imported, not copied). tests/test_gguf.c compares edgepatch's convert-gguf + forward pass against this.

usage: python tools/make_smollm2_reference.py SmolLM2-135M-Instruct.Q4_1.gguf
       [tests/fixtures/smollm2/reference.safetensors] [--compare-folder models/smollm2-135m-instruct]
--compare-folder also loads edgepatch convert-gguf's model.safetensors with the safetensors library and
reports, tensor by tensor, whether it equals the weights built here (it should, bit for bit).
Venv: tools/make_venv.sh (pins gguf==0.19.0).
Stores per prompt i: prompt{i}.ids (I32), prompt{i}.logits (F32 [len, vocab], every position),
prompt{i}.generated (I32, 10 greedy tokens: argmax of the last position, fed back).
"""
import hashlib
import json
import os
import sys

import gguf
import numpy as np
import safetensors.torch
import tokenizers
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_smollm_tokenizer import build_tokenizer, read_gguf_metadata  # noqa: E402

PROMPTS = [
    "France: Paris\nSpain: Madrid\nItaly:",
    "The capital of Germany is",
    "hot -> cold\nbig -> small\nfast ->",
]
N_GENERATED = 10

# llama.cpp's Llama names (gguf-py's tensor_mapping, MODEL_ARCH.LLAMA) -> HF names.
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
PER_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}


def unpermute(w, n_head):
    # convert_hf_to_gguf.py: w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    d = w.shape[0]
    return w.reshape(n_head, d // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    args = sys.argv[1:]
    compare = None
    if "--compare-folder" in args:
        i = args.index("--compare-folder")
        compare = args[i + 1]
        del args[i:i + 2]
    path = args[0]
    out = args[1] if len(args) > 1 else "tests/fixtures/smollm2/reference.safetensors"
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    reader = gguf.GGUFReader(path)

    def meta(key):
        return reader.fields[key].contents()

    n_head, n_kv = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
        if t.name in GLOBAL:
            name = GLOBAL[t.name]
        else:
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{PER_LAYER[kind]}.weight"
            if kind == "attn_q":
                w = unpermute(w, n_head)
            elif kind == "attn_k":
                w = unpermute(w, n_kv)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    if compare:
        converted = safetensors.torch.load_file(os.path.join(compare, "model.safetensors"))
        assert set(converted) == set(state), set(converted) ^ set(state)
        differ = [n for n in state if converted[n].shape != state[n].shape or not torch.equal(converted[n], state[n])]
        print(f"{compare}/model.safetensors: {len(state)} tensors, {len(differ)} differ from gguf-py's", differ[:5])
        assert not differ
    tied = "lm_head.weight" not in state
    config = transformers.LlamaConfig(
        vocab_size=len(meta("tokenizer.ggml.tokens")), hidden_size=meta("llama.embedding_length"),
        intermediate_size=meta("llama.feed_forward_length"), num_hidden_layers=meta("llama.block_count"),
        num_attention_heads=n_head, num_key_value_heads=n_kv,
        max_position_embeddings=meta("llama.context_length"), rms_norm_eps=meta("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=meta("llama.rope.freq_base"), tie_word_embeddings=tied, hidden_act="silu",
        bos_token_id=meta("tokenizer.ggml.bos_token_id"), eos_token_id=meta("tokenizer.ggml.eos_token_id"),
        attn_implementation="eager", torch_dtype="float32")
    model = transformers.LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()

    tok_json, _ = build_tokenizer(read_gguf_metadata(path))
    tok = tokenizers.Tokenizer.from_str(json.dumps(tok_json))
    tensors = {}
    with torch.no_grad():
        for i, text in enumerate(PROMPTS):
            ids = tok.encode(text).ids
            logits = model(torch.tensor([ids])).logits[0]
            gen, seq = [], list(ids)
            for _ in range(N_GENERATED):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                gen.append(nxt)
                seq.append(nxt)
            tensors[f"prompt{i}.ids"] = torch.tensor(ids, dtype=torch.int32)
            tensors[f"prompt{i}.logits"] = logits.float().contiguous()
            tensors[f"prompt{i}.generated"] = torch.tensor(gen, dtype=torch.int32)
            top = torch.topk(torch.log_softmax(logits[-1], -1), 5)
            print(f"prompt {i} {text!r}: {len(ids)} tokens; top-5",
                  [(tok.decode([int(t)]), round(float(v), 4)) for v, t in zip(top.values, top.indices)],
                  "; greedy", repr(tok.decode(gen)))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    safetensors.torch.save_file(tensors, out, metadata={
        "gguf_sha256": sha, "torch": torch.__version__, "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", "0.19.0"), "tokenizers": tokenizers.__version__,
        "prompts": json.dumps(PROMPTS)})
    print("wrote", out)


if __name__ == "__main__":
    main()
