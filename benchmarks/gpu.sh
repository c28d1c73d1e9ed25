#!/usr/bin/env bash
# The one command to run when a GPU is lent (under 9 minutes on an H100/H200, start-up aside):
#
#   benchmarks/gpu.sh OUT_DIR          # or: OUT=/path benchmarks/gpu.sh
#   benchmarks/gpu.sh --dry-run [DIR]  # CPU, tiny sizes, interpret mode: proves the script works
#                                      # (without DIR: a new temporary folder, printed)
#
# Steps, each under its own timeout (and all under GPU_SH_BUDGET_S, default 540 s) so that one
# hang cannot eat the budget; a failing step is recorded and the next one runs:
#   gpu_tests   pytest -m gpu (compiled kernels vs interpret mode vs the reference)
#   autotune    bounded autotune (time budget) that rewrites pallas_kernels/tuning_table.json
#               (a copy lands in OUT_DIR); the steps after it use the new table
#   mosaic      benchmarks/attention.py --mosaic: the Mosaic GPU kernels checked against the
#               reference at three shapes (Lane lowering, else Warpgroup), then fwd/bwd TFLOP/s
#               with bias, T=S 512..32k, D 64 and 128, beside the Triton kernels, jax's mgpu FA3
#               (no bias: the ceiling) and cuDNN with a dense bias
#   attention   benchmarks/attention.py: jt5 vs Pallas mha (no bias, a ceiling), cuDNN and XLA
#               with a dense bias; fwd/bwd TFLOP/s and memory, T=S 512..32k, D=64, bf16
#   encoder     T5-base encoder bf16 at 512 and 8k tokens: jt5 (pallas, xla) vs transformers SDPA;
#               then long inputs (benchmarks/long_encoder.py): T5-base bf16, full / local /
#               transient-global attention at 16k, 64k and 128k tokens (time, memory)
#   encoder_quant  benchmarks/encoder_quant.py --speed: the T5-XXL encoder (24 layers, random
#               weights) at 512 tokens, batch 1/4/16, bf16 compute with bf16 / int8 / fp8 weights
#   generate    benchmarks/generate.py, t5-base bf16, jt5 vs transformers
#   train       benchmarks/train.py: T5-base UL2 train step, tokens/s and MFU, pallas vs xla
#   plan        benchmarks/plan_check.py: jt5 plan's predicted memory for the encoder and train
#               rows above (compiled deviceless for this GPU kind) beside the GPU's own compile
#               and its allocator peak (plan_check.md)
# Everything goes to OUT_DIR: STEP.log per step, the benchmarks' JSON and markdown,
# summary.json and summary.md (one table of the steps, then the benchmark tables).
set -u
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-}}"
if [[ -z "$OUT_DIR" ]] && (( DRY )); then
  OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/jt5-gpu-dry-run.XXXXXX")"
  echo "output folder: $OUT_DIR"
fi
if [[ -z "$OUT_DIR" ]]; then
  echo "usage: benchmarks/gpu.sh [--dry-run] OUT_DIR   (or set OUT)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
# The dry run's limits only catch hangs: a loaded CI machine may take several times its ~70 s.
DEADLINE=$((SECONDS + ${GPU_SH_BUDGET_S:-$(( DRY ? 1500 : 540 ))}))
: > "$OUT_DIR/steps.tsv"

# step NAME TIMEOUT_S CMD...: run CMD with its output in NAME.log, at most TIMEOUT_S seconds
# (less if the overall budget is nearly spent); record rc and wall time.
step() {
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE - SECONDS))
  if (( left < 10 )); then
    printf '%s\tskipped\t0\tno budget left\n' "$name" >> "$OUT_DIR/steps.tsv"
    echo "== $name: skipped (budget spent)"; return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  local status=ok
  (( rc == 124 || rc == 137 )) && status="timeout"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="failed"
  printf '%s\t%s\t%s\trc=%s\n' "$name" "$status" "$((SECONDS - t0))" "$rc" >> "$OUT_DIR/steps.tsv"
  echo "   $status in $((SECONDS - t0)) s (rc $rc); tail of $name.log:"
  tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/   | /'
}

if (( DRY )); then
  # CPU: the same scripts and flags paths at tiny sizes, kernels in interpret mode.
  step gpu_tests 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_tuning.py
  step autotune 300 "$PY" -m jt5.pallas_kernels.tuning --show
  # Mosaic GPU's interpreter: its warpgroups need >= 4 XLA CPU threads (NPROC) to not deadlock.
  step mosaic 600 env NPROC="${NPROC:-8}" "$PY" benchmarks/attention.py --cpu-small --mosaic \
    --lengths 128 --heads 1 --tokens 128 --repeats 1 --json "$OUT_DIR/mosaic.json" \
    --markdown "$OUT_DIR/mosaic.md"
  step attention 300 "$PY" benchmarks/attention.py --cpu-small --lengths 128 --modes decoder \
    --repeats 1 --json "$OUT_DIR/attention.json" --markdown "$OUT_DIR/attention.md"
  step encoder 300 bash -c '"$1" benchmarks/attention.py --cpu-small --encoder tiny --lengths 64 \
    --json "$2/encoder.json" --markdown "$2/encoder.md" &&
    "$1" benchmarks/long_encoder.py --in-process --model tiny --attention pallas --lengths 128 \
    --impls jt5-tglobal --local-radius 15 --global-block-size 4 --repeats 1 \
    --json "$2/long_encoder.json" --markdown "$2/long_encoder.md"' _ "$PY" "$OUT_DIR"
  step encoder_quant 300 "$PY" benchmarks/encoder_quant.py --speed --preset tiny --batch 1,2 \
    --length 32 --dtype float32 --repeats 1 --json "$OUT_DIR/encoder_quant.json"
  step generate 300 "$PY" benchmarks/generate.py --models tiny --batch 2 --strategies greedy \
    --input-len 16 --new-tokens 4 --repeats 1 --json "$OUT_DIR/generate.json"
  step train 300 "$PY" benchmarks/train.py --preset tiny --steps 1 --warmup 1 --batch-size 2 \
    --inputs-length 32 --targets-length 8 --json "$OUT_DIR/train.json"
  step plan 300 "$PY" benchmarks/plan_check.py "$OUT_DIR" --encoder-model tiny \
    --encoder-dtype float32 --local-radius 15 --global-block-size 4
else
  step gpu_tests 75 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/
  step autotune 80 "$PY" -m jt5.pallas_kernels.tuning --write --lengths 2048 --head-dims 64 \
    --time-budget-s 55
  cp pallas_kernels/tuning_table.json "$OUT_DIR/tuning_table.json"
  step mosaic 150 "$PY" benchmarks/attention.py --mosaic --lengths 512,2048,8192,32768 \
    --head-dim 64,128 --repeats 10 --json "$OUT_DIR/mosaic.json" --markdown "$OUT_DIR/mosaic.md"
  step attention 110 "$PY" benchmarks/attention.py --lengths 512,2048,8192,32768 --repeats 10 \
    --json "$OUT_DIR/attention.json" --markdown "$OUT_DIR/attention.md"
  step encoder 150 bash -c '"$1" benchmarks/attention.py --encoder t5-base --lengths 512,8192 \
    --repeats 5 --json "$2/encoder.json" --markdown "$2/encoder.md" &&
    "$1" benchmarks/long_encoder.py --in-process --model t5-base --dtype bfloat16 \
    --attention pallas --impls jt5 jt5-local jt5-tglobal --lengths 16384 65536 131072 \
    --repeats 3 --json "$2/long_encoder.json" --markdown "$2/long_encoder.md"' _ "$PY" "$OUT_DIR"
  step encoder_quant 90 "$PY" benchmarks/encoder_quant.py --speed --preset t5-v1_1-xxl \
    --batch 1,4,16 --length 512 --repeats 5 --json "$OUT_DIR/encoder_quant.json"
  step generate 55 "$PY" benchmarks/generate.py --models t5-base --batch 1,16 \
    --strategies greedy --dtype bfloat16 --repeats 2 --json "$OUT_DIR/generate.json"
  step train 70 "$PY" benchmarks/train.py --steps 5 --warmup 1 --json "$OUT_DIR/train.json"
  step plan 90 "$PY" benchmarks/plan_check.py "$OUT_DIR" --encoder-model t5-base
fi

# summary.json + summary.md
"$PY" - "$OUT_DIR" "$DRY" <<'EOF'
import json, os, platform, sys
out, dry = sys.argv[1], sys.argv[2] == "1"
steps = [dict(zip(("step", "status", "seconds", "detail"), l.rstrip("\n").split("\t")))
         for l in open(os.path.join(out, "steps.tsv")) if l.strip()]
try:
    import jax
    env = f"jax {jax.__version__}, {jax.devices()[0].device_kind} ({jax.default_backend()})"
except Exception as e:  # the summary must still be written
    env = f"jax unavailable ({e})"
json.dump({"dry_run": dry, "env": env, "python": platform.python_version(), "steps": steps},
          open(os.path.join(out, "summary.json"), "w"), indent=1)
md = [f"# benchmarks/gpu.sh{' --dry-run' if dry else ''}", "", env, "",
      "| step | status | seconds | detail |", "|---|---|---|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail']} |" for s in steps]
for name in ("mosaic", "attention", "encoder", "long_encoder", "plan_check"):
    p = os.path.join(out, f"{name}.md")
    if os.path.exists(p):
        md += ["", f"## {name}", "", open(p).read().strip()]
for name in ("gpu_tests", "autotune", "encoder_quant", "generate", "train"):
    p = os.path.join(out, f"{name}.log")
    if os.path.exists(p):
        tail = open(p, errors="replace").read().splitlines()[-15:]
        md += ["", f"## {name} (last lines of {name}.log)", "", "```", *tail, "```"]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md[:6 + len(steps)]))
EOF
# exit status: 0 only if every step ran ok
! cut -f2 "$OUT_DIR/steps.tsv" | grep -qv '^ok$'
