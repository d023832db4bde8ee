"""A train_yoso_lora.py-shaped --output_dir without training: LoRAs with random nonzero weights (so every
module changes the UNet's output), latent statistics and validation grids. For the export tests."""

from pathlib import Path

import torch

RANK, ALPHA = 4, 3  # alpha != rank: a converter that drops alpha (scale 1 instead of 0.75) changes the output


def lora_unet(base, seed, rank=RANK, alpha=ALPHA):
    """The tiny base's UNet with a LoRA on every default target, A and B drawn from N(0, 0.1^2)."""
    from diffusers import UNet2DConditionModel

    from yoso.method.lora import add_lora

    unet = add_lora(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), rank=rank, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return unet


def make_output_dir(base, out, use_ema=True, validation_steps=(3, 10), prompts=("a red fox", "a blue car")):
    """Writes the files of a finished run into ``out``; returns ``out``."""
    from PIL import Image

    from yoso.data.latent_stats import LATENT_STATS_NAME, save_latent_stats
    from yoso.method.lora import save_lora

    out = Path(out)
    unet = lora_unet(base, seed=1)
    save_lora(unet, out)
    if use_ema:
        save_lora(lora_unet(base, seed=2), out / "non_ema")
    save_latent_stats(out / LATENT_STATS_NAME, 0.1 * torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3)),
                      0.9, 32)
    (out / "validation").mkdir(parents=True, exist_ok=True)
    for step in validation_steps:
        Image.new("RGB", (4 * 8, 8 * len(prompts)), (step, 0, 0)).save(out / "validation" / f"step-{step:06d}.png")
    (out / "validation" / "README.txt").write_text(
        "Each grid: one row per validation prompt; columns, left to right: lora 1-step, lora 2-step.\n"
        "Prompts:\n" + "\n".join(f"  {i + 1}. {p}" for i, p in enumerate(prompts)) + "\n")
    return out


def unet_output(unet, seed=0):
    """The UNet on fixed random inputs at t = 999 and 499 (as tests/test_train_script.py compares LoRAs)."""
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 499]), c).sample
