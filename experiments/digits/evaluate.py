"""Generate N images per digit for each row of the table, with fixed seeds, and measure them.

Every row samples the same prompts (digit-major, cycling through the caption templates) from the same
initial noise (``NOISE_SEED``), so rows differ only in model and sampler. Images go through the pipeline's
own decoding (``output_type="pt"``), then ``data.to_8x8`` and the classifier (``classifier.metrics``).

Rows (see ``row_specs``):

* reference: the real test images (the classifier's own test accuracy; the Fréchet reference itself),
  the real training images (the Fréchet distance two real samples of this size are apart), and the test
  images through the autoencoder (what the latent space can represent at best);
* the base model with SD1.5's samplers at 1, 2 and 4 steps: LCMScheduler, and DPM-Solver++ (the teacher's
  scheduler config), both with the teacher's guidance scale;
* the teacher: the base with DPM-Solver++ at 25 steps, guidance 3;
* YOSO-LoRA (EMA and non-EMA weights) at 1 step from noise, 1 step from the informative prior (IPI), 2 and
  4 steps, all with LCMScheduler and no classifier-free guidance (guidance 1), as YOSO-LoRA is sampled;
* YOSO-LoRA trained on the real training images instead of the teacher (``--train_data_dir``), EMA weights,
  sampled as the main run;
* the variant (``--consistency_loss mse``) and the ablations at 1 step and at 1 step with IPI (EMA weights).
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from experiments.digits import classifier as C
from experiments.digits import data as D

NOISE_SEED = 1234
IPI_SEED = 4321
SAMPLER_SEED = 777
PREVIEW_PER_DIGIT = 4
TEACHER_STEPS = 25
TEACHER_GUIDANCE = 3.0
IPI_TIMESTEP = 999


@dataclass(frozen=True)
class RowSpec:
    name: str  # file-name key
    label: str  # what the table shows
    group: str  # reference | base | teacher | yoso | real_data | ablation
    source: str = ""  # "base" or "teacher" (pipeline folder), or a real-data reference
    scheduler: str = ""  # "lcm", "dpm" (the teacher's DPM-Solver++ config) or "" for the folder's own
    steps: int = 0
    guidance: float = 1.0
    lora: str = ""  # folder under the run directory holding pytorch_lora_weights.safetensors
    stats: str = ""  # folder under the run directory holding latent_stats.safetensors (IPI rows)
    ipi: bool = False


# The real-data run's image folder, under the run directory (run.py writes it; ``REAL_DATA_FLAG`` in a run's
# flags stands for it).
IMAGEFOLDER = "yoso/digits_imagefolder"
REAL_DATA_FLAG = "--train_data_dir"

YOSO_RUNS = {
    # name -> (label, extra flags for train_yoso_lora.py)
    "main": ("YOSO-LoRA", []),
    "real_data": ("YOSO-LoRA on real images (no teacher)", [REAL_DATA_FLAG, IMAGEFOLDER]),
    "mse_consistency": ("variant: MSE consistency (--consistency_loss mse)", ["--consistency_loss", "mse"]),
    "kl_sample": ("ablation: --kl_weighting sample", ["--kl_weighting", "sample"]),
    # The script's defaults before it followed the released script (the first table was made with them).
    "old_defaults": ("ablation: the old defaults (--kl_weighting sample --init_lora_weights gaussian)",
                     ["--kl_weighting", "sample", "--init_lora_weights", "gaussian"]),
    "sample_reduction": ("ablation: --gan_loss_reduction sample", ["--gan_loss_reduction", "sample"]),
    "no_adversarial": ("ablation: no adversarial term (--lambda_adv 0)", ["--lambda_adv", "0"]),
    "no_consistency": ("ablation: no consistency term (--lambda_con 0)", ["--lambda_con", "0"]),
}
# Runs sampled like the main run (1 step, 1 step + IPI, 2 and 4 steps, EMA weights); the others at 1 step and
# 1 step + IPI.
FULL_ROW_RUNS = ("real_data",)


def row_specs(with_yoso=True, yoso_runs=tuple(YOSO_RUNS), guidance=TEACHER_GUIDANCE, teacher_steps=TEACHER_STEPS):
    rows = [
        RowSpec("real_test", "real test images (reference)", "reference", "real_test"),
        RowSpec("real_train", "real training images", "reference", "real_train"),
        RowSpec("vae_reconstruction", "test images through the autoencoder", "reference", "vae"),
    ]
    for sched, sched_label in (("lcm", "LCM"), ("dpm", "DPM-Solver++")):
        for steps in (1, 2, 4):
            rows.append(RowSpec(f"base_{sched}_{steps}", f"base, {sched_label}, {steps} step{'s' * (steps > 1)}", "base",
                                "base", sched, steps, guidance))
    rows.append(RowSpec("teacher", f"teacher (base, DPM-Solver++, {teacher_steps} steps)", "teacher", "teacher", "",
                        teacher_steps, guidance))
    if not with_yoso:
        return rows
    for weights, sub in (("EMA", ""), ("non-EMA", "/non_ema")):
        key = "ema" if not sub else "non_ema"
        lora = "yoso/main" + sub
        rows += [
            RowSpec(f"yoso_{key}_1", f"YOSO-LoRA {weights}, 1 step", "yoso", "base", "lcm", 1, 1.0, lora),
            RowSpec(f"yoso_{key}_1_ipi", f"YOSO-LoRA {weights}, 1 step + IPI", "yoso", "base", "lcm", 1, 1.0, lora,
                    "yoso/main", True),
            RowSpec(f"yoso_{key}_2", f"YOSO-LoRA {weights}, 2 steps", "yoso", "base", "lcm", 2, 1.0, lora),
            RowSpec(f"yoso_{key}_4", f"YOSO-LoRA {weights}, 4 steps", "yoso", "base", "lcm", 4, 1.0, lora),
        ]
    for run in FULL_ROW_RUNS:
        if run not in yoso_runs:
            continue
        label, lora = YOSO_RUNS[run][0], f"yoso/{run}"
        rows += [
            RowSpec(f"{run}_1", f"{label}, EMA, 1 step", run, "base", "lcm", 1, 1.0, lora),
            RowSpec(f"{run}_1_ipi", f"{label}, EMA, 1 step + IPI", run, "base", "lcm", 1, 1.0, lora, lora, True),
            RowSpec(f"{run}_2", f"{label}, EMA, 2 steps", run, "base", "lcm", 2, 1.0, lora),
            RowSpec(f"{run}_4", f"{label}, EMA, 4 steps", run, "base", "lcm", 4, 1.0, lora),
        ]
    for run, (label, _) in YOSO_RUNS.items():
        if run == "main" or run in FULL_ROW_RUNS or run not in yoso_runs:
            continue
        rows += [
            RowSpec(f"{run}_1", f"{label}, 1 step", "ablation", "base", "lcm", 1, 1.0, f"yoso/{run}"),
            RowSpec(f"{run}_1_ipi", f"{label}, 1 step + IPI", "ablation", "base", "lcm", 1, 1.0, f"yoso/{run}",
                    f"yoso/{run}", True),
        ]
    return rows


# ------------------------------------------------------------------------------------------ generation


def eval_noise(n_per_digit, latent_shape=(4, 8, 8)):
    """The shared initial noise [10 * n, *latent_shape] and the IPI's second draw, from fixed seeds."""
    n = 10 * n_per_digit
    noise = torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(NOISE_SEED))
    ipi = torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(IPI_SEED))
    return noise, ipi


def load_row_pipeline(spec, run_dir, device="cpu"):
    """The diffusers pipeline a row samples with (scheduler set, LoRA loaded)."""
    from diffusers import AutoPipelineForText2Image, DPMSolverMultistepScheduler, LCMScheduler

    run_dir = Path(run_dir)
    # The teacher is loaded the way the training script loads it.
    pipe = AutoPipelineForText2Image.from_pretrained(run_dir / spec.source)
    if spec.scheduler == "lcm":
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    elif spec.scheduler == "dpm":
        teacher_config = DPMSolverMultistepScheduler.load_config(run_dir / "teacher" / "scheduler")
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(teacher_config)
    if spec.lora:
        folder = run_dir / spec.lora
        if not (folder / "pytorch_lora_weights.safetensors").is_file():
            raise FileNotFoundError(f"row {spec.name}: no LoRA at {folder}/pytorch_lora_weights.safetensors")
        pipe.load_lora_weights(str(folder))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    # Every row starts from pure noise at t = 999 (a sampler that starts lower would not be a fair row).
    pipe.scheduler.set_timesteps(spec.steps)
    first = int(pipe.scheduler.timesteps[0])
    if first != 999:
        raise RuntimeError(f"row {spec.name}: the scheduler's first timestep is {first}, not 999")
    return pipe


def _sha256(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def model_fingerprint(spec, run_dir):
    """Hashes of the weights a row samples with, so a retrained model invalidates its cached rows."""
    run_dir = Path(run_dir)
    if spec.group == "reference":
        return {"vae": _sha256(run_dir / "base" / "vae" / "diffusion_pytorch_model.safetensors")} if spec.source == "vae" else {}
    files = {"unet": run_dir / spec.source / "unet" / "diffusion_pytorch_model.safetensors"}
    if spec.lora:
        files["lora"] = run_dir / spec.lora / "pytorch_lora_weights.safetensors"
    if spec.ipi:
        files["stats"] = run_dir / spec.stats / "latent_stats.safetensors"
    return {k: _sha256(v) for k, v in files.items()}


def ipi_start(scheduler, stats_path, noise, ipi_noise):
    """x_T = add_noise(mean + std * ipi_noise, noise, 999): the informative prior on the shared noise."""
    from safetensors.torch import load_file

    stats = load_file(str(stats_path))
    mean, std = stats["mean"].float(), stats["std"].float().reshape(())
    init = mean + std * ipi_noise
    timesteps = torch.full((len(noise),), IPI_TIMESTEP, dtype=torch.long)
    return scheduler.add_noise(init, noise, timesteps) / scheduler.init_noise_sigma


@torch.no_grad()
def generate(pipe, prompts, latents, steps, guidance, batch_size, seed=SAMPLER_SEED, progress=None):
    """Images in [-1, 1], [N, 3, H, W]. ``latents`` are what the UNet sees first (init_noise_sigma undone)."""
    out = []
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        z = (latents[i : i + batch_size] / pipe.scheduler.init_noise_sigma).to(pipe.device)
        images = pipe(prompt=prompts[i : i + batch_size], latents=z, num_inference_steps=steps, guidance_scale=guidance,
                      output_type="pt", generator=torch.Generator().manual_seed(seed + b)).images
        out.append(images.float().cpu() * 2.0 - 1.0)
        if progress is not None:
            progress.update(len(z))
    return torch.cat(out)


def real_images(kind, vae_dir=None):
    """Real reference rows: ([N, 3, 64, 64] in [-1, 1], labels)."""
    train_x, train_y, test_x, test_y = D.load_split()
    if kind == "real_train":
        return D.upscale(train_x), train_y
    images = D.upscale(test_x)
    if kind == "vae":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
        with torch.no_grad():
            images = torch.cat([vae.decode(vae.encode(images[i : i + 200]).latent_dist.mean).sample
                                for i in range(0, len(images), 200)]).clamp(-1, 1)
    return images, test_y


def preview(images, labels, per_digit=PREVIEW_PER_DIGIT):
    """uint8 [10, per_digit, H, W, 3]: the first images of each digit, for the figure."""
    labels = np.asarray(labels)
    rows = []
    for d in range(10):
        idx = np.flatnonzero(labels == d)[:per_digit]
        x = ((images[idx].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        if len(x) < per_digit:  # pad with white
            x = np.concatenate([x, np.full((per_digit - len(x), *x.shape[1:]), 255, np.uint8)])
        rows.append(x)
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------- stage


def evaluate_rows(run_dir, specs, n_per_digit, batch_size=250, quiet=False, device="cpu"):
    """Evaluate every row of ``specs`` whose result is missing or was made with other settings. Results go to
    ``run_dir/eval/<name>.json`` (numbers) and ``<name>.npz`` (8x8 images, labels, preview). Returns the list
    of result dicts in ``specs`` order."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # scheduler-config and LoRA-prefix notices, once per row
    if quiet:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    run_dir = Path(run_dir)
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    clf = C.DigitClassifier.load(run_dir / "classifier.npz")
    _, _, test8, _ = C.real_8x8_split()
    reference = clf.features(test8)
    prompts, labels = D.eval_prompts(n_per_digit)
    noise, ipi_noise = eval_noise(n_per_digit)

    results = []
    total = sum(len(prompts) for s in specs if s.group != "reference")
    bar = tqdm(total=total, desc="evaluation (images)", disable=quiet, mininterval=5.0, dynamic_ncols=True)
    for spec in specs:
        json_path, npz_path = eval_dir / f"{spec.name}.json", eval_dir / f"{spec.name}.npz"
        settings = {"spec": asdict(spec), "n_per_digit": n_per_digit if spec.group != "reference" else None,
                    "noise_seed": NOISE_SEED, "ipi_seed": IPI_SEED, "sampler_seed": SAMPLER_SEED,
                    "weights": model_fingerprint(spec, run_dir)}
        if json_path.is_file() and npz_path.is_file():
            old = json.loads(json_path.read_text())
            if old.get("settings") == settings:
                results.append(old)
                if spec.group != "reference":
                    bar.update(len(prompts))
                continue
        t0 = time.time()
        if spec.group == "reference":
            images, row_labels = real_images(spec.source, run_dir / "base" / "vae")
        else:
            bar.set_description(f"evaluation: {spec.name}")
            pipe = load_row_pipeline(spec, run_dir, device)
            latents = noise
            if spec.ipi:
                latents = ipi_start(pipe.scheduler, run_dir / spec.stats / "latent_stats.safetensors", noise, ipi_noise)
            images = generate(pipe, prompts, latents, spec.steps, spec.guidance, batch_size, progress=bar)
            row_labels = labels
            del pipe
        seconds = time.time() - t0
        images8 = D.to_8x8(images)
        numbers = C.metrics(clf, images8, row_labels, reference)
        if not all(np.isfinite(v) for k, v in numbers.items() if k != "per_digit_accuracy"):
            raise RuntimeError(f"row {spec.name}: non-finite metrics {numbers}")
        result = {"name": spec.name, "label": spec.label, "group": spec.group, "steps": spec.steps,
                  "guidance": spec.guidance, "images": int(len(images8)), "seconds": seconds, **numbers,
                  "settings": settings}
        np.savez_compressed(npz_path, images8=images8.astype(np.float32), labels=np.asarray(row_labels),
                            preview=preview(images, row_labels))
        result["total_seconds"] = time.time() - t0
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
    bar.close()
    return results
