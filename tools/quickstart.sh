#!/usr/bin/env bash
# A newcomer's first command: installs the packages, builds edgepatch and runs the main job on the
# embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
./build/edgepatch --version
# Until the pipeline stages land, the main job is a forward pass with greedy generation on the committed
# tiny Gemma-2-shaped model.
./build/edgepatch forward --model tests/fixtures/models/gemma2-tiny --ids 2,100,200,300 --generate 8
