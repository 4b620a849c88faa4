#!/usr/bin/env bash
# The thread count never changes a result (docs/distribution.md): a small pruning run (attribution
# scores, a head round then an edge round) on smollm-tiny and on smollm-wide, the same model with an
# MLP of 532 (random weights, made here): sums over more than ~400 terms are where OpenBLAS's own
# threading changed the bits (the fixtures' 96 never showed it). With OPENBLAS_NUM_THREADS and
# OMP_NUM_THREADS both 1, 2 or 4, only OMP_NUM_THREADS=2, or neither (the CPUs of the affinity mask,
# which Open MPI narrows to one core per rank at -np 2), each unlaunched and under mpirun -np 1, 2 and 4:
# every file of every run folder byte-identical to the unlaunched 1-thread run's (same file list too).
# Every run writes the same output_path and is moved aside after, so even paths inside files agree.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_rmaps_base_oversubscribe=1
unset OPENBLAS_NUM_THREADS OMP_NUM_THREADS  # tests/CMakeLists.txt sets them to 1; each run sets its own
mpi_asan="ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"  # as in cli_mpi.sh
if ! command -v mpirun > /dev/null; then echo "cli_threads: mpirun not found" >&2; exit 1; fi

# smollm-wide: smollm-tiny's config, tokenizer and weights, with intermediate_size 532 and new random MLP
# weights (uniform in +-0.15, a fixed seed).
mkdir -p "$tmp/models/smollm-wide"
python3 - tests/fixtures/models/smollm-tiny "$tmp/models/smollm-wide" <<'PY' || { echo "cli_threads: cannot make smollm-wide" >&2; exit 1; }
import array, json, os, random, shutil, struct, sys
src, dst = sys.argv[1:]
for f in os.listdir(src):
    if f != "model.safetensors" and f != "config.json": shutil.copy(os.path.join(src, f), dst)
cfg = json.load(open(os.path.join(src, "config.json")))
old, new = cfg["intermediate_size"], 532
cfg["intermediate_size"] = new
json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=1)
raw = open(os.path.join(src, "model.safetensors"), "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
head = json.loads(raw[8:8 + n])
rng = random.Random(19)
out_head, blobs, off = {"__metadata__": head.get("__metadata__", {})}, [], 0
for name in sorted(k for k in head if k != "__metadata__"):
    t = head[name]
    if ".mlp." in name:
        shape = [new if d == old else d for d in t["shape"]]
        data = array.array("f", (rng.uniform(-0.15, 0.15) for _ in range(shape[0] * shape[1]))).tobytes()
    else:
        shape, (b0, b1) = t["shape"], t["data_offsets"]
        data = raw[8 + n + b0:8 + n + b1]
    out_head[name] = {"dtype": t["dtype"], "shape": shape, "data_offsets": [off, off + len(data)]}
    blobs.append(data)
    off += len(data)
h = json.dumps(out_head).encode()
h += b" " * (-len(h) % 8)
with open(os.path.join(dst, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
PY

config() {  # model (a fixture, or smollm-wide)
  printf '{"task": "person_sport", "model_name": "%s_prune_heads_in_circuits", "model_path": "%s", "output_path": "%s/run", "n_prompts": 8, "batch_size": 4, "seed": 3, "n_shots": 4, "max_new_tokens": 3, "affect_whom": [["x", "y"]], "importance": "attribution", "prune_rounds": {"heads": 1, "edges": 1}, "prune_fraction": 0.3}\n' \
    "$1" "$([ "$1" = smollm-wide ] && echo "$tmp/models/$1" || echo "tests/fixtures/models/$1")" "$tmp" > "$tmp/run.json"
}
run() {  # name ranks(0: no mpirun) threads(1, 2, 4, omp2 or unset): the folder ends in $tmp/$name, status in $rc
  local name=$1 np=$2 vars=()
  case $3 in
    unset) ;;
    omp2) vars=(OMP_NUM_THREADS=2) ;;
    *) vars=(OPENBLAS_NUM_THREADS=$3 OMP_NUM_THREADS=$3) ;;
  esac
  rm -rf "$tmp/run"
  if [ "$np" = 0 ]; then env "${vars[@]}" timeout 300 "$bin" run "$tmp/run.json" > "$tmp/$name.out" 2>&1
  else env "$mpi_asan" "${vars[@]}" timeout 300 mpirun -np "$np" "$bin" run "$tmp/run.json" > "$tmp/$name.out" 2>&1; fi
  rc=$?
  mv "$tmp/run" "$tmp/$name"
}
same_as() {  # ref name: the same files, byte for byte
  local f bad_files=""
  if [ "$(cd "$tmp/$1" && find . -type f | sort)" != "$(cd "$tmp/$2" && find . -type f | sort)" ]; then
    echo "  $2: other files than $1: $(diff <(cd "$tmp/$1" && find . -type f | sort) <(cd "$tmp/$2" && find . -type f | sort) | tr '\n' ' ')" >&2
    return 1
  fi
  for f in $(cd "$tmp/$1" && find . -type f | sort); do
    cmp -s "$tmp/$1/$f" "$tmp/$2/$f" || bad_files="$bad_files ${f#./}"
  done
  [ -z "$bad_files" ] || { echo "  $2 differs from $1 in:$bad_files" >&2; return 1; }
}

for model in smollm-tiny smollm-wide; do
  config $model
  run $model-ref 0 1
  [ $rc = 0 ] && [ -f "$tmp/$model-ref/circuit.json" ] && ok || bad "$model: reference run: status $rc: $(tail -3 "$tmp/$model-ref.out")"
  n=0 same=0
  for np in 0 1 2 4; do
    for threads in 1 2 4 omp2 unset; do
      [ $np = 0 ] && [ $threads = 1 ] && continue
      name=$model-np$np-t$threads
      run $name $np $threads
      n=$((n + 1))
      [ $rc = 0 ] && same_as $model-ref $name && { ok; same=$((same + 1)); } ||
        bad "$model: $([ $np = 0 ] && echo unlaunched || echo "mpirun -np $np"), threads $threads: status $rc or differs: $(tail -2 "$tmp/$name.out")"
    done
  done
  echo "  $model: $same of $n runs (unlaunched, mpirun -np 1, 2, 4 x threads 1, 2, 4, OMP only 2, unset) byte-identical to the unlaunched 1-thread run ($(cd "$tmp/$model-ref" && find . -type f | wc -l) files each)"
done
finish cli_threads
