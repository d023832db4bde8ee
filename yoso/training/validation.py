"""Validation images during training: 1-step (guidance 1.0) and 2-step (guidance 1.5) LCMScheduler samples
of the validation prompts, from the live LoRA and from its EMA, saved as one PNG grid and logged to the trackers.

It never casts the trainable weights (the pipeline is assembled from the training modules as they are)
and draws its noise from its own seeded generator, so it does not perturb the training run.
"""

from pathlib import Path

import numpy as np
import torch

from yoso.outputs.output_files import add_validation_grid
from yoso.utils.atomic import atomic_path

VALIDATION_STEPS = (1, 2)
# The published usage: 2 steps with guidance 1.5; one step without guidance.
VALIDATION_GUIDANCE = {1: 1.0, 2: 1.5}


@torch.no_grad()
def generate_validation_images(unet, vae, text_encoder, tokenizer, scheduler_config, prompts, seed, resolution, device,
                               autocast, ema=None):
    """Returns ``(columns, images)``: column labels and the images, row-major (one row per prompt)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=LCMScheduler.from_config(scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    weights = [("lora", False)] + ([("ema", True)] if ema is not None else [])
    columns, by_column = [], []
    for label, use_ema in weights:
        if use_ema:
            ema.swap()
        try:
            for steps in VALIDATION_STEPS:
                generator = torch.Generator(device=device).manual_seed(seed)
                with autocast():
                    images = pipeline(prompts, num_inference_steps=steps, guidance_scale=VALIDATION_GUIDANCE[steps], generator=generator,
                                      height=resolution, width=resolution).images
                columns.append(f"{label} {steps}-step")
                by_column.append(images)
        finally:
            if use_ema:
                ema.swap()
    rows = [[column[i] for column in by_column] for i in range(len(prompts))]
    return columns, [image for row in rows for image in row]


def save_and_log_validation(accelerator, columns, images, prompts, step, output_dir):
    from diffusers.utils import make_image_grid

    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid = make_image_grid(images, rows=len(prompts), cols=len(columns))
    path = folder / f"step-{step:06d}.png"
    with atomic_path(path) as tmp:
        grid.save(tmp)
    add_validation_grid(output_dir, f"validation/{path.name}")
    (folder / "README.txt").write_text(
        "Each grid: one row per validation prompt; columns, left to right: " + ", ".join(columns) + " "
        + "(guidance " + ", ".join(f"{steps}-step {g}" for steps, g in VALIDATION_GUIDANCE.items()) + ").\n"
        + "Prompts:\n" + "\n".join(f"  {i + 1}. {p}" for i, p in enumerate(prompts)) + "\n"
    )
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=f"{prompts[i // len(columns)]} | {columns[i % len(columns)]}")
                                        for i, image in enumerate(images)]}, step=step)
    return path
