#!/usr/bin/env bash
# One prepared GPU run for issue 6 (and issue 3's data benchmark), for the device tool:
#
#   run(command="bash benchmarks/gpu_run.sh", timeout_s=600)
#
# Uses only what the device image has preinstalled (python3 with jax 0.11.x, flax, optax,
# torch 2.11, triton; no pip, no network): the package is used from the working tree via
# PYTHONPATH=., and nothing imported needs tensorflow_datasets (checked below).
# Everything lands in $OUT (at most 8 files come back; this writes 6):
#   env.txt                 nvidia-smi, versions, import check
#   throughput_gpu.json     benchmarks/throughput.py, all rows (rewritten after each row)
#   throughput.log          its console output and table
#   bench_data_gpu.json     benchmarks/bench_data.py on a generated phantom dataset
#   bench_data.log          its console output
#   timing.txt              wall seconds of each stage
# Time: TOTAL_S (default 500 s) bounds the whole script (plus 1-2 min of machine start, so
# about 10 min of device time; the tool's per-call limit is 600 s). Throughput rows start in
# priority order (bf16 rows first: the targets; then float32) until THROUGHPUT_BUDGET_S
# (default 290 s); later rows are recorded as skipped. The data benchmark keeps RESERVE_S
# (default 100 s; it needs about 60 s). Each row costs roughly 1-2 min on a fresh machine,
# mostly compilation (torch.compile train + inference, XLA single-step + scan + inference),
# so expect the four bf16 rows; run again with EXTRA_ARGS="--dtypes float32" for the rest.
# After the run, copy the JSON files into benchmarks/results/ and the table into README.md.

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
TOTAL_S=${TOTAL_S:-500}
THROUGHPUT_BUDGET_S=${THROUGHPUT_BUDGET_S:-290}
RESERVE_S=${RESERVE_S:-100}
EXTRA_ARGS=${EXTRA_ARGS:-}
T0=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - T0) )); }
stage() { echo "$1 $(( $(date +%s) - T0 )) s" >> "$OUT/timing.txt"; }

# 0. Environment, and the import check (no tensorflow / tensorflow_datasets).
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY - <<'EOF'
import sys, importlib.metadata as md
for d in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "numpy",
          "torch", "triton", "pillow"):
    try:
        print(d, md.version(d))
    except Exception as e:
        print(d, "MISSING", e)
import unet_jax.train.steps  # noqa: F401
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
print("tensorflow modules imported by unet_jax.train.steps:", bad or "none")
import jax
print("jax devices:", jax.devices())
EOF
} > "$OUT/env.txt" 2>&1
stage env

# Phantom BUSI-layout data for bench_data.py (the shared BUSI folder does not travel),
# generated on the CPU in the background, niced, while the GPU benchmark runs.
# PHANTOM_COUNTS: benign malignant normal (default: BUSI's 437 210 133).
PHANTOM=/tmp/busi_phantom
read -r NB NM NN <<< "${PHANTOM_COUNTS:-437 210 133}"
nice -n 19 $PY -c "
from unet_jax.data.phantom import write_phantom
write_phantom('$PHANTOM', {'benign': $NB, 'malignant': $NM, 'normal': $NN}, overwrite=True)
" > "$OUT/phantom.log" 2>&1 &
PHANTOM_PID=$!

# 1. Throughput: JAX vs the PyTorch peer, in one process on this GPU.
timeout -k 10 $(( $(left) - RESERVE_S )) $PY benchmarks/throughput.py \
  --budget-s "$THROUGHPUT_BUDGET_S" --out "$OUT/throughput_gpu.json" $EXTRA_ARGS \
  > "$OUT/throughput.log" 2>&1
RC=$?
echo "throughput exit $RC" >> "$OUT/throughput.log"
stage throughput
# If the combined process died before finishing a row (e.g. the two frameworks could not
# share the process), measure each framework in its own process instead.
if [ $RC -ne 0 ] && ! grep -q '"derived"' "$OUT/throughput_gpu.json" 2>/dev/null; then
  half=$(( ($(left) - RESERVE_S) / 2 ))
  if [ "$half" -gt 60 ]; then
    timeout -k 10 $half $PY benchmarks/throughput.py --frameworks jax --dtypes bfloat16 \
      --budget-s $(( half - 60 )) --out "$OUT/throughput_gpu_jax.json" >> "$OUT/throughput.log" 2>&1
    timeout -k 10 $half $PY benchmarks/throughput.py --frameworks torch --dtypes bfloat16 \
      --budget-s $(( half - 60 )) --out "$OUT/throughput_gpu_torch.json" >> "$OUT/throughput.log" 2>&1
    stage throughput_fallback
  fi
fi

# 2. The data benchmark (issue 3) on the phantom data.
wait $PHANTOM_PID
stage phantom
rm -f benchmarks/results/bench_data_gpu.json
timeout -k 10 $(( $(left) - 5 )) $PY benchmarks/bench_data.py --data "$PHANTOM" --repeats 2 \
  > "$OUT/bench_data.log" 2>&1
echo "bench_data exit $?" >> "$OUT/bench_data.log"
cp benchmarks/results/bench_data_gpu.json "$OUT/" 2>/dev/null || true
cat "$OUT/phantom.log" >> "$OUT/bench_data.log"; rm -f "$OUT/phantom.log"
stage bench_data
tail -n 25 "$OUT/throughput.log"
tail -n 8 "$OUT/bench_data.log"
cat "$OUT/timing.txt"
