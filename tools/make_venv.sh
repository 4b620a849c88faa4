#!/usr/bin/env bash
# Creates the Python venv used only to regenerate test fixtures and run the torch benchmarks
# (never needed to build or test edgepatch: the fixtures are committed).
# Versions are pinned to what the original code used (transformers 4.44.2).
set -euo pipefail
venv=${1:-.venv}
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "torch==2.4.1" "transformers==4.44.2" "tokenizers==0.19.1" \
  "safetensors==0.4.5" "numpy<2" "sentencepiece==0.2.0" \
  "gguf==0.19.0"  # tools/make_smollm2_reference.py: gguf-py's reader and dequantization
"$venv/bin/python" -c "import torch, transformers, tokenizers; print('venv ok: torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
