"""Creates a random-weight model with the real SmolLM-135M shape (LlamaForCausalLM: hidden 576, 30
layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152, tied embeddings, rope_theta 10000) for
the forward benchmark. Throughput does not depend on the weights, so no download is needed. Writes
config.json + model.safetensors (fp32) to OUT (default /tmp/ep-bench/smollm-135m); never commit it.
"""
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/ep-bench/smollm-135m"
    if os.path.exists(os.path.join(out, "model.safetensors")):
        print(f"{out}: exists")
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu",
                      bos_token_id=0, eos_token_id=0, torch_dtype="float32")
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
