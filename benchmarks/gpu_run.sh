#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call on one GPU (about 5-6 minutes on an H100/H200):
# 1. benchmarks/fp16_end_to_end.py: train_yoso_lora.py in fp16 on the tiny models (train, resume, load, sample);
# 2. the step at the published recipe (sd15: SD1.5 base, SD-Turbo teacher, 512 px, fp16, batch 16, LoRA rank 64,
#    EMA), gradient checkpointing off and on: --step_order generator_first / discriminator_first x
#    --discriminator_chunks 1 / 2, and the memory model's recommended flags for each (--memory_flags: the
#    README's card table; per-phase peak memory, MFU, host syncs per step);
# 3. the same with --channels_last, then with --torch_compile (compile time reported apart).
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh   # $OUT/fp16_e2e_<card>.json (+ _validation.png), gpu_run.log,
#                                              # $OUT/bench_{order,channels_last,compile}_<card>.{json,md}
#   OUT=/tmp/x bash benchmarks/gpu_run.sh --dry-run   # CPU check: fp16 emulated, the three calls' options, the
#                                                     # first call on the tiny models
#
# Inner time limits (seconds, environment): E2E_TIMEOUT 150, ORDER_TIMEOUT 180, CHANNELS_LAST_TIMEOUT 60,
# COMPILE_TIMEOUT 150: 540 s together, under the 10 minutes a device call may take (each limit kills 15 s later at most).
#
# On a machine with torch, accelerate and huggingface_hub but not this project's other packages (a bare GPU
# box that cannot reach PyPI), bring the pinned wheels in a .whl/ folder at the repository root:
#   pip download --no-deps -d .whl diffusers==0.42.1 peft==0.21.2 transformers==5.24.0 open_clip_torch==3.3.0 importlib_metadata
# If diffusers is not importable and .whl/ exists, this script installs them into /tmp/yoso-site first.
#
# Needs torch (CUDA), diffusers, transformers, accelerate, peft, safetensors, psutil and open_clip_torch
# (only its BPE vocabulary file) importable; nothing is downloaded. Each configuration's result is written to
# the JSON as soon as it is measured; a configuration that runs out of memory is recorded as "oom" and the
# others still run.
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
E2E_LIMIT=${E2E_TIMEOUT:-150}
# The dry run shares a loaded CPU with other jobs: its limits are the caller's (the test's own timeout).
[ "$DRY_RUN" = 1 ] && E2E_ARGS+=(--emulate_on_cpu) && E2E_LIMIT=${E2E_TIMEOUT:-900}
timeout --signal=TERM --kill-after=15 "$E2E_LIMIT" "$PY" benchmarks/fp16_end_to_end.py "${E2E_ARGS[@]}"
E2E_RC=$?
echo "== fp16 end-to-end exit code $E2E_RC"

if [ "$DRY_RUN" = 1 ]; then
  CARD=dryrun
else
  NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" 2>/dev/null)
  case "$NAME" in
    *H100*) CARD=h100 ;;
    *H200*) CARD=h200 ;;
    none) echo "gpu_run.sh: error: no CUDA device visible to torch"; exit 1 ;;
    *) CARD=$(echo "$NAME" | tr '[:upper:] ' '[:lower:]_' | tr -cd 'a-z0-9_') ;;
  esac
fi

RC=0
# bench NAME LIMIT_SECONDS ARGS...: one benchmark process, its JSON (written after every configuration, so a
# timeout keeps what was measured), its Markdown tables and a status line.
bench() {
  local name=$1 limit=$2
  shift 2
  local json="$OUT/bench_${name}_${CARD}.json"
  echo "== benchmark $name: $* -> $json"
  local start=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$PY" benchmarks/bench_train_step.py "$@" --output "$json"
  local rc=$?
  echo "== benchmark $name exit code $rc after $(( $(date +%s) - start )) s (124: timed out; results so far are in the JSON)"
  if [ -f "$json" ]; then
    # The benchmark writes its tables at the end; after a time limit, make them from the JSON so far.
    [ -f "${json%.json}.md" ] || "$PY" benchmarks/bench_train_step.py --print_table "$json" > "${json%.json}.md" 2>>"$LOG" \
      || echo "table: failed"
    "$PY" - "$json" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
statuses = [f"{r['name']}={r['status']}" for r in report.get("results", [])]
print("== configurations:", ", ".join(statuses) or "none")
PYEOF
  else
    echo "gpu_run.sh: no JSON was written for $name"
  fi
  [ "$rc" != 0 ] && RC=$rc
  return 0
}

# The GPU calls. 1. Memory and speed of the step's orders at the published recipe (sd15, fp16, batch 16, rank
# 64, 512 px, EMA, teacher on), gradient checkpointing off and on: today's order against D's update first, each
# with D's update in one pass and in two, and the memory model's recommended flags (--memory_flags: without
# checkpointing --step_order discriminator_first --generator_chunks 2, with it --generator_chunks 4
# --discriminator_chunks 2); per-phase peak memory, MFU, host syncs. Fused AdamW is on (auto).
ORDER_ARGS=(--recipe --gradient_checkpointing off on --step_order generator_first discriminator_first
            --discriminator_chunks 1 2 --memory_flags --warmup_steps 2 --steps 3)
# 2. channels-last convolutions, eager.
CHANNELS_LAST_ARGS=(--recipe --gradient_checkpointing off on --channels_last --warmup_steps 2 --steps 3 --no_flops)
# 3. Regional torch.compile (inductor): compile time apart from s/step. Last: the slowest to start.
COMPILE_ARGS=(--recipe --gradient_checkpointing on off --torch_compile --warmup_steps 2 --steps 3 --no_flops)

if [ "$DRY_RUN" = 1 ]; then
  # The three calls' options checked as they are, then the first one run on the tiny models on CPU (CI time: no
  # warm-up step, checkpointing on, D in two pieces; test_tiny_smoke_run and tests/test_step.py run the rest).
  "$PY" benchmarks/bench_train_step.py "${ORDER_ARGS[@]}" --check || RC=1
  "$PY" benchmarks/bench_train_step.py "${CHANNELS_LAST_ARGS[@]}" --check || RC=1
  "$PY" benchmarks/bench_train_step.py "${COMPILE_ARGS[@]}" --check || RC=1
  bench order 900 --config tiny --device cpu --mixed_precision no --batch_size 2 --warmup_steps 0 --steps 1 --threads 1 \
    --gradient_checkpointing on --step_order generator_first discriminator_first --discriminator_chunks 2 --memory_flags
else
  bench order "${ORDER_TIMEOUT:-180}" "${ORDER_ARGS[@]}"
  bench channels_last "${CHANNELS_LAST_TIMEOUT:-60}" "${CHANNELS_LAST_ARGS[@]}"
  bench compile "${COMPILE_TIMEOUT:-150}" "${COMPILE_ARGS[@]}"
fi

ls -la "$OUT"
[ "$RC" = 0 ] && RC=$E2E_RC
exit "$RC"
