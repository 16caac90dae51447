#!/usr/bin/env bash
# Run ON the GPU machine (device tool), after scripts/gpu_prepare.sh here, carrying .whl and
# .cache. Step 1 (~1 min per target): every MNIST target's paper profile as a smoke run on
# CUDA, the check that the paper profiles run on a GPU at all (device placement, sizes, AMP-free
# kernels); logs and a summary go to $OUT. Step 2, with what is left of TIME_LEFT seconds: the
# paper profile of PAPER_TARGET (default aaa-mnist), whose checkpoints resume if it is cut off.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-check}"; mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}"; TIME_LEFT="${TIME_LEFT:-480}"; start=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 AESHIELD_CACHE="${AESHIELD_CACHE:-$PWD/.cache/aeshield}"
for f in "$AESHIELD_CACHE"/data/mnist/*.gz; do [ -e "$f" ] && gunzip -f "$f"; done
aeshield="python3 -m aeshield.cli"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee "$OUT/summary.txt"
for t in ${TARGETS:-demo aaa-mnist aaa-ensemble-mnist puvae-mnist s2snet-mnist dbp-mnist dbp-draw-mnist corruption-mnist}; do
  s=$(date +%s)
  timeout 300 $aeshield reproduce "$t" --profile paper --smoke --device "$DEVICE" --jobs 1 --no-progress --out "$OUT/smoke" > "$OUT/smoke-$t.log" 2>&1
  echo "smoke $t rc=$? $(( $(date +%s) - s ))s" | tee -a "$OUT/summary.txt"
done
left=$(( TIME_LEFT - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
  timeout "$left" $aeshield reproduce "${PAPER_TARGET:-aaa-mnist}" --profile paper --device "$DEVICE" --jobs 1 --no-progress --out "$OUT/paper" > "$OUT/paper.log" 2>&1
  echo "paper ${PAPER_TARGET:-aaa-mnist} rc=$? (124: cut off at ${left}s; its checkpoints resume)" | tee -a "$OUT/summary.txt"
fi
