"""Training health over a trial's runs (``run.py --seeds ... --trial NAME --health``): each checkpoint's EMA LoRA
sampled at 1 step and scored with the digits classifier (a smaller sample than the table's), beside D's accuracy
from the run's tensorboard log, per seed; drawn into ``<prefix>_health.png`` with the numbers in ``.json``.

A checkpoint holds the raw LoRA in diffusers format and the EMA as a registered object (``custom_checkpoint_<i>.pkl``:
names, shadow tensors); ``export_checkpoint_ema`` writes the EMA under the raw file's keys and metadata.
"""

import dataclasses
import json
import re
from pathlib import Path

import torch

from experiments.digits.evaluate import RowSpec, row_specs

# The teacher scored on as many images as a checkpoint: the Fréchet distance's small-sample bias grows as the sample
# shrinks, so the checkpoints' curves are read against this line, not the table's 1,000-image teacher row.
HEALTH_TEACHER = "health_teacher"

LORA = "pytorch_lora_weights.safetensors"


def checkpoint_ema_state(checkpoint):
    """The EMA's state dict (names, shadow, num_updates) saved in ``checkpoint``."""
    for path in sorted(Path(checkpoint).glob("custom_checkpoint_*.pkl")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and {"names", "shadow", "num_updates"} <= set(state):
            return state
    raise FileNotFoundError(f"{checkpoint}: no EMA state (was the run trained with --use_ema?)")


def export_checkpoint_ema(checkpoint, dest):
    """``dest/pytorch_lora_weights.safetensors``: the checkpoint's EMA LoRA, keyed and tagged as its raw LoRA."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    checkpoint, dest = Path(checkpoint), Path(dest)
    with safe_open(str(checkpoint / LORA), "pt") as raw:
        keys, metadata = list(raw.keys()), raw.metadata()
    state = checkpoint_ema_state(checkpoint)
    ema = {"unet." + name.replace(".default.", "."): tensor for name, tensor in zip(state["names"], state["shadow"])}
    if set(ema) != set(keys):
        missing = sorted(set(keys) ^ set(ema))[:3]
        raise ValueError(f"{checkpoint}: the EMA's tensors do not match the LoRA's keys, e.g. {missing}")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / (LORA + ".tmp")
    save_file({k: ema[k].float().contiguous() for k in keys}, str(tmp), metadata=metadata)
    tmp.replace(dest / LORA)
    return dest / LORA


def checkpoint_steps(run_dir):
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return sorted(found)


def health_row_specs(out, trial_dir, runs, seeds):
    """One 1-step EMA row per checkpoint of every (run, seed) of the trial; exports the EMA LoRAs as needed."""
    out, rows = Path(out), []
    for run in runs:
        for seed in seeds:
            run_dir = f"{trial_dir}/{run}_seed{seed}"
            for step, checkpoint in checkpoint_steps(out / run_dir):
                lora = f"{run_dir}/health/step-{step}"
                if not (out / lora / LORA).is_file() or (out / lora / LORA).stat().st_mtime < (checkpoint / LORA).stat().st_mtime:
                    export_checkpoint_ema(checkpoint, out / lora)
                name = f"health_{trial_dir.replace('/', '_')}_{run}_{seed}_{step}"
                rows.append(RowSpec(name, f"{run}, seed {seed}, step {step}, EMA, 1 step", f"health_{run}", "base", "lcm",
                                    1, 1.0, lora))
    teacher = next(r for r in row_specs(with_yoso=False) if r.name == "teacher")
    return rows + [dataclasses.replace(teacher, name=HEALTH_TEACHER)]


def tracker_scalars(run_dir, keys=("d_accuracy", "loss_adv", "d_grad_norm", "grad_norm", "ema_distance")):
    """{key: [(step, value)]} from the run's tensorboard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(run_dir, "logs").rglob("events.out.tfevents.*"))
    result = {k: [] for k in keys}
    for path in files:
        log = EventAccumulator(str(path), size_guidance={"scalars": 0})
        log.Reload()
        for key in keys:
            if key in log.Tags().get("scalars", []):
                result[key] += [(e.step, e.value) for e in log.Scalars(key)]
    return {k: sorted(v) for k, v in result.items()}


def write_health_report(out, trial_dir, runs, seeds, results, figures_dir, prefix, command):
    """``<prefix>_health.json`` (per run and seed: D accuracy per step, 1-step EMA Fréchet distance and accuracy
    per checkpoint; the teacher on as many images) and ``<prefix>_health.png`` (one row per run: D accuracy over
    training, and 1-step quality)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, figures_dir = Path(out), Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    by_name = {r["name"]: r for r in results}
    teacher = by_name[HEALTH_TEACHER]  # health_row_specs always adds it
    payload = {"command": command, "trial": trial_dir, "teacher_frechet": teacher["frechet"],
               "teacher_images": teacher["images"], "runs": {}}
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for i, run in enumerate(runs):
        payload["runs"][run] = {}
        for seed in seeds:
            run_dir = out / f"{trial_dir}/{run}_seed{seed}"
            scalars = tracker_scalars(run_dir)
            points = []
            for step, _ in checkpoint_steps(run_dir):
                r = by_name.get(f"health_{trial_dir.replace('/', '_')}_{run}_{seed}_{step}")
                if r is not None:
                    points.append({"step": step, "frechet": r["frechet"], "accuracy": r["accuracy"],
                                   "diversity": r["diversity"], "images": r["images"]})
            payload["runs"][run][str(seed)] = {"checkpoints": points, "tracker": scalars}
            acc = scalars["d_accuracy"]
            if acc:
                window = max(1, len(acc) // 40)
                smooth = [sum(v for _, v in acc[max(0, j - window + 1):j + 1]) / len(acc[max(0, j - window + 1):j + 1])
                          for j in range(len(acc))]
                axes[i, 0].plot([s for s, _ in acc], smooth, label=f"seed {seed}")
            if points:
                axes[i, 1].plot([p["step"] for p in points], [p["frechet"] for p in points], marker="o", label=f"seed {seed}")
        axes[i, 0].set(title=f"{run}: D accuracy (moving mean)", xlabel="optimizer step", ylim=(0, 1.02))
        axes[i, 0].axhline(0.5, color="grey", lw=0.8, ls=":")
        axes[i, 1].set(title=f"{run}: 1-step EMA Fréchet distance per checkpoint", xlabel="optimizer step")
        axes[i, 1].axhline(teacher["frechet"], color="grey", lw=0.8, ls="--", label="teacher, as many images")
        for ax in axes[i]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    png, js = figures_dir / f"{prefix}_health.png", figures_dir / f"{prefix}_health.json"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    # Compact: the per-step tracker series make an indented file ~50k lines for five seeds; the figure is for reading.
    js.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    return {"figure": str(png), "json": str(js)}
