#!/usr/bin/env bash
# Every GPU figure of the project in one prepared command (issue 13), for the device tool:
#
#   run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=600)
#
# with .gpu packed here first (benchmarks/gpu_carry.py: the wheels the device image lacks,
# the grayscale cache and the RGB cache as a 0.3 MB residual; 30 MiB, which with the 25 MB
# working tree stays under the tool's 64 MiB):
#
#   unet-jax data prepare ../shared/data --out .cache/busi256 --size 256
#   unet-jax data prepare ../shared/data --out .cache/busi256_rgb --size 256 --channels 3
#   python3 -m benchmarks.gpu_carry pack .cache/busi256 .cache/busi256_rgb --out .gpu
#
# and afterwards, here: python3 -m benchmarks.ingest_gpu <the folder the files came back to>
#
# One call does not hold every stage at the costs measured on the H200 (2026-12-04): a
# throughput row takes about 150 s (XLA autotuning and torch.compile), a training stage
# about 150 s beyond its capped training (the first epoch's compilation, 55 s, and the final
# evaluation). Stages run in priority order; with device time left, a second call runs the
# rest: bash benchmarks/gpu_run.sh --stages train_base,train_report (--total-s N, too).
#
# The work is benchmarks/gpu_run.py (its docstring lists the stages: environment,
# throughput against PyTorch with the bf16 peak, the two capped training runs, augmentation's
# share of a step, the levers), each stage in its own process under a share of TOTAL_S
# (default 480 s: with the machine's start this stays inside the tool's 10-minute call).
# Uses what the device image ships (python3 with jax 0.11.x, flax, optax, orbax, torch; no
# pip index, no network) plus the carried wheels; the package is used from the working tree
# via PYTHONPATH. At most 8 files land in $OUT (6: summary.json, throughput.json,
# runs.tar.gz, augment.json, levers.json, log.txt); the last screen printed is the summary.
# The same command on a CPU with DRY_RUN=1 runs everything tiny (tests/test_gpu_run.py).

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
GPU_CARRY=${GPU_CARRY:-$PWD/.gpu}
if [ -d "$GPU_CARRY" ]; then
  if ls "$GPU_CARRY"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu_run_site "$GPU_CARRY"/wheels/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_run_site"
  fi
  if [ -f "$GPU_CARRY/busi256_rgb.residual.npz" ]; then
    "$PY" -m benchmarks.gpu_carry unpack "$GPU_CARRY" >&2 || exit 1
  fi
  export CACHE_GRAY=${CACHE_GRAY:-$GPU_CARRY/busi256} CACHE_RGB=${CACHE_RGB:-$GPU_CARRY/busi256_rgb}
fi
# `bash benchmarks/gpu_run.sh profile [ARGS]`: issue 31's profile of the training step instead
# (benchmarks/gpu_profile.py: HLO, per-op device time, the levers, the PyTorch peer; <= 5 min).
if [ "${1:-}" = "profile" ]; then
  shift
  timeout -k 10 "${PROFILE_S:-330}" "$PY" -m benchmarks.gpu_profile --out "$OUT" "$@"
  RC=$?
  [ $RC -eq 124 ] || [ $RC -eq 137 ] && echo "gpu_profile.py stopped by the hard time limit; files so far in $OUT"
  exit $RC
fi
ARGS=(--out "$OUT")
if [ "${DRY_RUN:-0}" = "1" ]; then ARGS+=(--dry-run); TOTAL_S=${TOTAL_S:-1200}; fi
TOTAL_S=${TOTAL_S:-480}
ARGS+=(--total-s "$TOTAL_S")
# A hard stop a little after the budget: the driver writes its files after every stage, so
# whatever finished is in $OUT even if this kills it.
timeout -k 10 $(( ${TOTAL_S%.*} + 60 )) "$PY" -m benchmarks.gpu_run "${ARGS[@]}" "$@"
RC=$?
if [ $RC -eq 124 ] || [ $RC -eq 137 ]; then
  echo "gpu_run.py stopped by the hard time limit; files written so far are in $OUT"
fi
exit $RC
