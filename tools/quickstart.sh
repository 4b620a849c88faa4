#!/usr/bin/env bash
# A newcomer's first command: installs the packages, builds edgepatch and runs the main job on the
# embedded default (configs/default.json: Country-Capital on the committed tiny Gemma-2-shaped model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
./build/edgepatch --version
# The stages that exist so far: tokenize (prompts, types, donors), then a look at one prompt and a
# forward pass with greedy generation on it.
./build/edgepatch run configs/default.json --until tokenize
(./build/edgepatch show runs/default --prompt 0 || true) | head -n 20
./build/edgepatch forward --model tests/fixtures/models/gemma2-tiny --text $'France: Paris\nSpain: Madrid\nItaly:' --generate 4
