#!/usr/bin/env bash
# The GPU check (issue 17), prepared for a machine with an NVIDIA GPU and no network access, such
# as the device machine of a session: under 10 minutes, one summary at the end.
#
#   here:   bash scripts/gpu_check.sh --build   # flava and flava-bench with --features cuda, stripped,
#                                               # into gpu-bin/ (carry it; it is git-ignored)
#   there:  bash scripts/gpu_check.sh           # 1. embed parity with transformers on the CUDA device
#                                               # 2. a short pretraining on it, with its evaluation
#                                               # 3. benches/compare_pytorch.py --device cuda --quick
#
# FLAVA_GPU_CHECK_DEVICE=flex FLAVA_GPU_BIN=target/release runs steps 1-2 on the CPU (a dry run of
# this script); FLAVA_GPU_CHECK_BENCH=0 skips step 3. Writes its logs under ${OUT:-/tmp/gpu-check}.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--build" ]; then
  set -e
  bash scripts/setup_cuda_build.sh
  cargo build --release -p flava-train -p flava-benches --features flava-train/cuda,flava-benches/cuda \
    --target-dir target/cuda
  mkdir -p gpu-bin
  for b in flava flava-bench; do
    cp target/cuda/release/$b gpu-bin/$b && strip gpu-bin/$b
  done
  ls -la gpu-bin
  exit 0
fi
DEVICE=${FLAVA_GPU_CHECK_DEVICE:-cuda}
BIN=${FLAVA_GPU_BIN:-gpu-bin}
LOG=${OUT:-/tmp/gpu-check}
mkdir -p "$LOG"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
summary=()
note() { summary+=("$1"); echo "== $1"; }
if [ "$DEVICE" = cuda ]; then
  nvidia-smi -L 2>&1 | head -4
  note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
fi
note "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
for b in flava flava-bench; do
  if [ ! -x "$BIN/$b" ]; then
    echo "$BIN/$b is missing: build it with 'bash scripts/gpu_check.sh --build' first" >&2
    exit 2
  fi
done

# 1. Parity: flava embed on the device against the transformers numbers in the fixture.
t0=$SECONDS
args=(embed --device "$DEVICE" --json --max-length 16 --model tests/fixtures/embed_model
  --image tests/fixtures/processor/landscape_300x200.png --image tests/fixtures/processor/rgba_80x64.png
  --text "a photo of a cat" --text "two red squares left of a blue circle" --text "dogs playing")
if "$BIN/flava" "${args[@]}" > "$LOG/embed.json" 2> "$LOG/embed.err"; then
  parity=$("$PY" - "$LOG/embed.json" tests/fixtures/embed_expected.json <<'PYEOF'
import json, sys
got, want = (json.load(open(p)) for p in sys.argv[1:3])
worst = {}
for k in ("image_features", "text_features", "logits_per_image"):
    worst[k] = max(abs(a - b) for ra, rb in zip(got[k], want[k]) for a, b in zip(ra, rb))
# GPU matmuls may use TF32: 1e-2 on features of norm ~1 and logits of scale ~10.
ok = all(v <= 1e-2 for v in worst.values())
print(("PASS" if ok else "FAIL") + " " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
PYEOF
)
else
  parity="FAIL (flava embed exited $?; see $LOG/embed.err: $(tail -1 "$LOG/embed.err"))"
fi
note "parity on $DEVICE vs transformers (max |diff|, tolerance 1e-2): $parity ($((SECONDS - t0)) s)"

# 2. A short pretraining on the device: 100 steps of the tiny default, a 20-s dVAE, the evaluation.
rm -rf "$LOG/run"
t0=$SECONDS
if "$BIN/flava" pretrain --device "$DEVICE" --steps 100 --dvae-time 20 --checkpoint-every 50 \
  --out "$LOG/run" > "$LOG/pretrain.log" 2>&1; then
  eval_line=$("$PY" -c "
import json; e = json.load(open('$LOG/run/eval.json'))
print(f\"zero-shot top-1 {100*e['zero_shot']['top1']:.1f}%, MLM {100*e['mlm_accuracy']:.1f}%, MIM {100*e['mim_accuracy']:.1f}%\")")
  steps_per_s=$("$PY" -c "
import json
rows = [json.loads(l) for l in open('$LOG/run/metrics.jsonl')]
t = sum(r['step_time_s'] for r in rows[10:]); print(f'{(len(rows) - 10) / max(t, 1e-9):.1f}')")
  note "pretrain on $DEVICE: PASS in $((SECONDS - t0)) s, $steps_per_s steps/s after step 10; $eval_line"
else
  note "pretrain on $DEVICE: FAIL ($(tail -1 "$LOG/pretrain.log"))"
fi

# 3. The PyTorch comparison on the GPU.
if [ "${FLAVA_GPU_CHECK_BENCH:-1}" = 1 ] && [ "$DEVICE" = cuda ]; then
  if FLAVA_BENCH_BIN="$BIN/flava-bench" timeout 300 "$PY" benches/compare_pytorch.py --device cuda --no-build \
    --quick --json "$LOG/compare.json" > "$LOG/compare.txt" 2>&1; then
    note "compare_pytorch --device cuda --quick: PASS (table in $LOG/compare.txt)"
    cat "$LOG/compare.txt"
  else
    note "compare_pytorch --device cuda: FAIL ($(tail -1 "$LOG/compare.txt"))"
  fi
fi

echo
echo "==== gpu_check summary"
printf '%s\n' "${summary[@]}" | tee "$LOG/summary.txt"
! grep -q FAIL "$LOG/summary.txt"
