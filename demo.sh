#!/usr/bin/env bash
# The whole job on the embedded default, on CPU, offline, in a few minutes:
#   tiny SD1.5- and SD-Turbo-shaped models -> sample JourneyDB annotations -> prepare_journeydb.py
#   -> accelerate launch train_yoso_lora.py -> inference_examples.py with the trained LoRA.
# Usage: bash demo.sh [OUTPUT_DIR]     (default: demo_output)
set -euo pipefail
case "${1:-}" in
  -h|--help)
    echo "Usage: bash demo.sh [OUTPUT_DIR]"
    echo "The whole job on tiny offline models, on CPU, in a few minutes: models and sample annotations,"
    echo "prepare_journeydb.py, train_yoso_lora.py (30 steps), inference_examples.py (2-step LCM, 1-step IPI)."
    echo "OUTPUT_DIR: where everything goes (default: demo_output)."
    exit 0 ;;
  -*)
    echo "demo.sh: error: unknown option $1 (usage: bash demo.sh [OUTPUT_DIR]; see --help)" >&2
    exit 2 ;;
esac
cd "$(dirname "$0")"
OUT="${1:-demo_output}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source scripts/setup_env.sh
mkdir -p "$OUT"
say() { printf '\n==> %s\n' "$*"; }

say "1/5 tiny models (random weights, offline) and sample JourneyDB annotations"
if [ ! -f "$OUT/models/sd15/model_index.json" ] || [ ! -f "$OUT/models/teacher/model_index.json" ]; then
  "$PY" -m yoso.testing --output_dir "$OUT/models" --sample_annotations "$OUT/data/train_anno.jsonl.tgz"
fi

say "2/5 prepare_journeydb.py"
"$PY" prepare_journeydb.py "$OUT/data/train_anno.jsonl.tgz" --output_file "$OUT/data/train_anno.jsonl" \
  --shuffle --val_count 2 --pretrained_model_name_or_path "$OUT/models/sd15"

say "3/5 train_yoso_lora.py (accelerate launch, 1 CPU process, 30 steps)"
mapfile -t VAL_PROMPTS < "$OUT/data/train_anno_val.txt"
rm -rf "$OUT/lora"
ACCELERATE_USE_CPU=true "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
  --mixed_precision no --dynamo_backend no train_yoso_lora.py \
  --pretrained_model_name_or_path "$OUT/models/sd15" --pretrained_teacher_model "$OUT/models/teacher" \
  --train_data "$OUT/data/train_anno.jsonl" --resolution 64 --output_dir "$OUT/lora" \
  --train_batch_size 4 --max_train_steps 30 --learning_rate 1e-3 --lora_rank 8 \
  --use_ema --ema_decay 0.9 --checkpointing_steps 15 --checkpoints_total_limit 1 \
  --validation_prompts "${VAL_PROMPTS[@]}" --validation_steps 15 --report_to tensorboard

say "4/5 inference_examples.py: 2-step LCM with the trained LoRA"
"$PY" inference_examples.py --pretrained_model_name_or_path "$OUT/models/sd15" --lora "$OUT/lora" --mode lcm \
  --prompt_file "$OUT/data/train_anno_val.txt" --output_dir "$OUT/images/lcm_2step"

say "5/5 inference_examples.py: 1 step with the informative prior (latent_stats.safetensors from training)"
"$PY" inference_examples.py --pretrained_model_name_or_path "$OUT/models/sd15" --lora "$OUT/lora" --mode one_step_ipi \
  --prompt_file "$OUT/data/train_anno_val.txt" --output_dir "$OUT/images/one_step_ipi"

cat <<DONE

Done. Outputs:
  prompts          $OUT/data/train_anno.jsonl  (summary: $OUT/data/train_anno.summary.json)
  LoRA (EMA)       $OUT/lora/pytorch_lora_weights.safetensors   raw: $OUT/lora/non_ema/
  latent stats     $OUT/lora/latent_stats.safetensors
  checkpoint       $(ls -d "$OUT"/lora/checkpoint-* | tail -1)
  validation grids $OUT/lora/validation/
  tensorboard      $OUT/lora/logs/   (tensorboard --logdir $OUT/lora/logs)
  image grids      $OUT/images/lcm_2step/grid.png  $OUT/images/one_step_ipi/grid.png
The models are tiny and random, so the images are noise: this run shows the pipeline works end to end.
For real training see README.md, "Train".
DONE
