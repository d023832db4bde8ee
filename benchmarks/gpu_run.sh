#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call on one GPU (about 4-6 minutes on an H100):
# 1. benchmarks/fp16_end_to_end.py: train_yoso_lora.py in fp16 on the tiny models (train, resume, load, sample);
# 2. the README's performance figures: the sd15 configuration (SD1.5 base, SD-Turbo teacher, 512 px, LoRA
#    rank 64), fp16, batch 4 and 16, gradient checkpointing off and on, teacher-latent cache off and on.
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh   # $OUT/fp16_e2e_<card>.json (+ _validation.png),
#                                              # $OUT/bench_sd15_<card>.json, .md and gpu_run.log
#   OUT=/tmp/x bash benchmarks/gpu_run.sh --dry-run   # the same on CPU: tiny models, fp16 emulated (a check)
#
# On a machine with torch, accelerate and huggingface_hub but not this project's other packages (a bare GPU
# box that cannot reach PyPI), bring the pinned wheels in a .whl/ folder at the repository root:
#   pip download --no-deps -d .whl diffusers==0.42.1 peft==0.21.2 transformers==5.24.0 open_clip_torch==3.3.0 importlib_metadata
# If diffusers is not importable and .whl/ exists, this script installs them into /tmp/yoso-site first.
#
# Needs torch (CUDA), diffusers, transformers, accelerate, peft, safetensors, psutil and open_clip_torch
# (only its BPE vocabulary file) importable; nothing is downloaded. Each configuration's result is written to
# the JSON as soon as it is measured; a configuration that runs out of memory is recorded as "oom" and the
# others still run. BENCH_TIMEOUT (seconds, default 420) bounds the benchmark itself.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/yoso-bench}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

exec > >(tee -a "$LOG") 2>&1
echo "== gpu_run.sh $(date -u +%FT%TZ) dry_run=$DRY_RUN"
if ! "$PY" -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  echo "== installing .whl/*.whl into /tmp/yoso-site"
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/yoso-site .whl/*.whl || echo "wheel install failed"
  export PYTHONPATH="/tmp/yoso-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv
else
  echo "nvidia-smi: not found"
fi

"$PY" - <<'EOF'
import importlib, importlib.util, platform
print("python", platform.python_version())
for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "huggingface_hub",
             "tokenizers", "psutil"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as error:
        print(name, "IMPORT FAILED:", type(error).__name__, error)
spec = importlib.util.find_spec("open_clip")
print("open_clip", list(spec.submodule_search_locations)[0] if spec else "MISSING (needed for the CLIP vocabulary)")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch cuda:", torch.version.cuda,
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
EOF

echo "== fp16 end-to-end training check"
E2E_ARGS=(--output_dir "$OUT")
[ "$DRY_RUN" = 1 ] && E2E_ARGS+=(--emulate_on_cpu)
timeout --signal=TERM --kill-after=15 "${E2E_TIMEOUT:-360}" "$PY" benchmarks/fp16_end_to_end.py "${E2E_ARGS[@]}"
E2E_RC=$?
echo "== fp16 end-to-end exit code $E2E_RC"

if [ "$DRY_RUN" = 1 ]; then
  CARD=dryrun
  ARGS=(--config tiny --device cpu --mixed_precision no --batch_size 2 4 --gradient_checkpointing off on
        --cache off on --warmup_steps 1 --steps 1 --threads 1)
else
  NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" 2>/dev/null)
  case "$NAME" in
    *H100*) CARD=h100 ;;
    *H200*) CARD=h200 ;;
    none) echo "gpu_run.sh: error: no CUDA device visible to torch"; exit 1 ;;
    *) CARD=$(echo "$NAME" | tr '[:upper:] ' '[:lower:]_' | tr -cd 'a-z0-9_') ;;
  esac
  ARGS=(--config sd15 --mixed_precision fp16 --batch_size 4 16 --gradient_checkpointing off on
        --cache off on --warmup_steps 2 --steps 4)
fi
JSON="$OUT/bench_sd15_${CARD}.json"
[ "$DRY_RUN" = 1 ] && JSON="$OUT/bench_tiny_dryrun.json"

echo "== benchmark: ${ARGS[*]} -> $JSON"
START=$(date +%s)
timeout --signal=TERM --kill-after=15 "${BENCH_TIMEOUT:-420}" "$PY" benchmarks/bench_train_step.py "${ARGS[@]}" --output "$JSON"
RC=$?
echo "== benchmark exit code $RC after $(( $(date +%s) - START )) s (124: timed out; results so far are in the JSON)"

if [ -f "$JSON" ]; then
  "$PY" benchmarks/bench_train_step.py --print_table "$JSON" > "${JSON%.json}.md" 2>>"$LOG" || echo "table: failed"
  "$PY" - "$JSON" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
statuses = [f"{r['name']}={r['status']}" for r in report.get("results", [])]
print("== configurations:", ", ".join(statuses) or "none")
EOF
else
  echo "gpu_run.sh: no JSON was written"
fi
ls -la "$OUT"
[ "$RC" = 0 ] && RC=$E2E_RC
exit "$RC"
