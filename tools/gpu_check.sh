#!/usr/bin/env bash
# The GPU check, in one run on a CUDA machine (README, Speed): the CUDA tests (pytest -m cuda), the benchmark lines
# on the GPU against diffusers (fp16 and bf16 inference, peak memory), the paper's per-GPU training setting, and an
# A/B of channels_last and CUDA graphs. Random weights, no network. Every part is time-boxed (caps 330 s in all, the
# whole script within DEADLINE, so that two runs fit in ten minutes) so that one failure or overrun does
# not lose the rest; the exit status is non-zero when any part failed, overran its limit or was not reached. Writes
# $OUT/gpu_report.txt and prints it.
#
# Needs the diffusers wheel in .whl/ (the GPU machine has torch, transformers and torchmetrics, not diffusers), or
# diffusers already importable; checked first:
#   python -m pip download diffusers==0.42.1 --no-deps -d .whl
# then, on the CUDA machine, from the repository root: bash tools/gpu_check.sh
# The bf16 training lines do not fit the budget; run them alone when wanted:
#   python3 bench.py --device cuda --reps 2 train-controlnet-bf16 train-controlnet++-bf16 train-innercontrol-bf16
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
REPORT=$OUT/gpu_report.txt LOG=$OUT/gpu_check.log
export GPU_REPORT=$OUT/cuda_checks.txt PYTHONUNBUFFERED=1
: >"$REPORT"; : >"$LOG"; : >"$GPU_REPORT"
START=$(date +%s) DEADLINE=380  # seconds for everything, the wheel's install and model building included
FAILED=()  # the parts that failed, overran or were not reached

say() { echo "$*" | tee -a "$REPORT"; }
left() { echo $((DEADLINE - ($(date +%s) - START))); }

# part NAME CAP COMMAND...: runs COMMAND under a timeout of min(CAP, time left), its output to the log and, for the
# lines that matter, to the report
part() {
    local name=$1 cap=$2 t rc t0
    shift 2
    t=$(left); t=$((t < cap ? t : cap))
    if [ "$t" -lt 20 ]; then say "== $name: skipped, $(left) s left"; FAILED+=("$name (not reached)"); return; fi
    t0=$(date +%s)
    echo "== $name: $*" >>"$LOG"
    timeout --kill-after=5 "$t" "$@" >"$OUT/part.out" 2>>"$LOG"
    rc=$?
    cat "$OUT/part.out" >>"$LOG"
    local status="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="stopped at its ${t} s limit"
    [ $rc -ne 0 ] && [ "$status" = "ok" ] && status="failed (exit code $rc)"
    say "== $name: $status, $(( $(date +%s) - t0 )) s"
    [ "$status" = "ok" ] || FAILED+=("$name ($status)")
    grep -E '^(train-|unet|cfg-step|[0-9]+ (passed|failed|skipped)|FAILED|ERROR|=+ .*(passed|failed|error))' \
        "$OUT/part.out" | tee -a "$REPORT"
}

# prerequisites first: the diffusers wheel in .whl/, or diffusers importable as it is
shopt -s nullglob
WHEELS=(.whl/diffusers-*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${WHEELS[@]}" >>"$LOG" 2>&1; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        say "!! the diffusers wheel in .whl/ did not install (see $LOG)"
        FAILED+=("the diffusers wheel's install")
    fi
elif ! python3 -c "import diffusers" >>"$LOG" 2>&1; then
    say "gpu_check.sh: diffusers is missing; get its wheel:" \
        "\`python -m pip download diffusers==0.42.1 --no-deps -d .whl\` (in the repository root)"
    exit 2
fi

say "GPU check ($(git log -1 --format='commit %h' 2>/dev/null || echo 'a working tree'), $(date -u '+%F %H:%M UTC'))"
python3 - <<'PY' 2>&1 | tee -a "$REPORT"
import torch
try:
    import diffusers
    d = diffusers.__version__
except Exception as e:  # noqa: BLE001
    d = f"missing ({e})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
else:
    gpu = "!! no CUDA device"
print(f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
      f"diffusers {d}")
PY

# 1. the CUDA tests: half precision against fp32, fp16 GradScaler, resume, sampling against diffusers, fused paths
part "pytest -m cuda" 120 python3 -m pytest -q -m cuda -rfE -s tests/
[ -s "$GPU_REPORT" ] && cat "$GPU_REPORT" | tee -a "$REPORT"
# 2. inference lines (ours vs diffusers, fp16 and bf16), with the A/B of channels_last (unet-nchw) and graphs
part "bench: unet, cfg-step" 60 python3 bench.py --device cuda --reps 10 \
    unet unet-bf16 cfg-step cfg-step-bf16 unet-nchw cfg-step-eager
# 3. training steps at 512 px, batch 4, fp16 (one process per side runs the three methods)
part "bench: train fp16" 100 python3 bench.py --device cuda --reps 3 train-controlnet train-controlnet++ train-innercontrol
# 4. the paper's per-GPU setting: 512 px, batch 8, fp16, gradient checkpointing
part "bench: train-innercontrol-512" 50 python3 bench.py --device cuda --reps 2 train-innercontrol-512

python3 - "$REPORT" <<'PY' | tee -a "$REPORT"
import re, sys
text = open(sys.argv[1]).read()
def field(name, pattern):
    m = re.search(rf"^{re.escape(name)}: .*?{pattern}", text, re.M)
    return float(m.group(1)) if m else None
goals = [("train-innercontrol time ratio", field("train-innercontrol", r"\bratio ([0-9.]+)"), 0.6),
         ("train-innercontrol memory ratio", field("train-innercontrol", r"memory ratio ([0-9.]+)"), 0.7),
         ("train-innercontrol-512 peak GB (batch 8)", field("train-innercontrol-512", r"peak GPU memory ([0-9.]+) GB"), 16),
         ("cfg-step fp16 time ratio", field("cfg-step", r"\bratio ([0-9.]+)"), 0.9)]
print("== goals")
for name, value, goal in goals:
    verdict = "not measured" if value is None else ("met" if value <= goal else "missed")
    print(f"{name}: {value} (goal <= {goal}): {verdict}")
PY
rm -f "$OUT/part.out"
say "== total $(( $(date +%s) - START )) s; the full log is $LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
    say "== FAILED: $(IFS=';'; echo "${FAILED[*]}" | sed 's/;/; /g')"
else
    say "== all parts ok"
fi
echo; echo "----- $REPORT -----"; cat "$REPORT"
[ ${#FAILED[@]} -eq 0 ]
