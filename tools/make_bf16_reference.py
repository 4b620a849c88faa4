"""References for bf16 runs (model_to_backend with bf16 on), from HuggingFace transformers 4.44.2.

A bf16 run of edgepatch rounds every weight to bf16, feeds every matrix product bf16 inputs (the
activation rounded to bf16 as it enters the product), sums the exact products in fp32 and keeps every
activation between ops in fp32; Gemma's embedding factor is the bf16 one. This script builds that
computation from HF's own modules, independently of our code: the fp32 model with its weights rounded
to bf16, a forward pre-hook on every nn.Linear that rounds its input to bf16, and a hook on Gemma's
embedding that turns HF's fp32 factor into the bf16 one. It also records what HF computes in true bf16
(torch_dtype=bfloat16: every activation rounded), to show how far a bf16 run is from HF's bf16.

Writes tests/fixtures/reference/bf16/<variant>.safetensors: prompt{i}.logits (the emulation, fp32) and
prompt{i}.hf_bf16_logits, for the prompts (prompt{i}.ids) of tests/fixtures/reference/<variant>.safetensors.
Run with the venv of tools/make_venv.sh:  python tools/make_bf16_reference.py
"""
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["gemma2-tiny", "llama3-tiny", "smollm-tiny", "phi2-tiny"]


def bf16(t):
    return t.to(torch.bfloat16).to(torch.float32)


def emulated_model(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(bf16(p))
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda m, args: (bf16(args[0]),) + tuple(args[1:]))
    if model.config.model_type == "gemma2":
        s = model.config.hidden_size ** 0.5
        factor = bf16(torch.tensor(s)).item() / torch.tensor(s, dtype=torch.float32).item()
        model.model.embed_tokens.register_forward_hook(lambda m, args, out: out * factor)
    return model


def main():
    out_dir = os.path.join(ROOT, "tests", "fixtures", "reference", "bf16")
    os.makedirs(out_dir, exist_ok=True)
    for variant in VARIANTS:
        folder = os.path.join(ROOT, "tests", "fixtures", "models", variant)
        ref = load_file(os.path.join(ROOT, "tests", "fixtures", "reference", variant + ".safetensors"))
        emu = emulated_model(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, attn_implementation="eager")
        hf.eval()
        tensors, worst = {}, 0.0
        i = 0
        while f"prompt{i}.ids" in ref:
            ids = ref[f"prompt{i}.ids"].to(torch.long).unsqueeze(0)
            with torch.no_grad():
                a = emu(input_ids=ids, use_cache=False).logits[0].float()
                b = hf(input_ids=ids, use_cache=False).logits[0].float()
            tensors[f"prompt{i}.ids"] = ref[f"prompt{i}.ids"].clone()
            tensors[f"prompt{i}.logits"] = a.contiguous()
            tensors[f"prompt{i}.hf_bf16_logits"] = b.contiguous()
            rel = ((a - b).abs().amax(dim=1) / b.abs().amax(dim=1)).max().item()
            worst = max(worst, rel)
            i += 1
        save_file(tensors, os.path.join(out_dir, variant + ".safetensors"))
        print(f"{variant}: {i} prompts, emulation vs HF bf16 max row-relative logits difference {worst:.3e}")


if __name__ == "__main__":
    main()
