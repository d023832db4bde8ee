"""The multi-step base model, trained here from scratch on the digits, in Stable Diffusion 1.5's layout.

Three parts, trained in order, then saved as an ordinary diffusers ``StableDiffusionPipeline`` folder:

1. A small CLIP text encoder (``CLIPTextModel``) over SD1.5's real CLIP tokenizer (77 tokens). SD1.5's text
   encoder is a pretrained CLIP model that stays frozen while the UNet trains; here it is pretrained for a
   few seconds to tell the digit a caption names (a linear head on the mean of its output tokens), then
   frozen the same way.
2. A small ``AutoencoderKL`` (four blocks -> scale factor 8, 4 latent channels) trained on the 64x64 training
   images with L1 + MSE reconstruction and a small KL term. Its ``scaling_factor`` is set, as SD's was, to
   1 / (standard deviation of the training latents).
3. A small ``UNet2DConditionModel`` (SD1.5's block pattern: cross-attention in every level but the lowest)
   trained with SD1.5's objective: the DDPM "scaled_linear" schedule over 1000 steps, epsilon prediction, MSE,
   uniform timesteps, 10% of captions dropped to "" so classifier-free guidance works. The saved UNet is an
   exponential moving average of the trained weights.

The base folder holds SD1.5's scheduler config (PNDM). The teacher folder is the same weights with a
DPM-Solver++ (2nd order) scheduler config, which the YOSO training script's teacher flags sample with.
"""

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from experiments.digits import data as D

TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
VAE_CHANNELS = (4, 8, 16, 32)
UNET_CHANNELS = (32, 64)


def sd15_scheduler_config():
    from yoso.testing import SD15_SCHEDULER_CONFIG

    return dict(SD15_SCHEDULER_CONFIG)


def _progress(iterable, desc, quiet):
    return tqdm(iterable, desc=desc, disable=quiet, mininterval=5.0, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- text


def build_text_encoder(seed):
    from transformers import CLIPTextConfig, CLIPTextModel

    from yoso.testing import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=TEXT_CONFIG["hidden_size"],
        **TEXT_CONFIG,
    )
    return CLIPTextModel(config)


def tokenize(tokenizer, prompts):
    """Token ids exactly as StableDiffusionPipeline makes them: padded to 77, truncated."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def pretrain_text_encoder(text_encoder, tokenizer, steps, lr, seed, quiet=False):
    """Teach the text encoder which digit each caption names (all 50 captions per step, cross-entropy on a
    linear head over the mean output token). Returns the final training accuracy."""
    prompts = D.all_prompts()
    labels = torch.tensor([d for _ in range(len(D.TEMPLATES)) for d in range(10)])
    ids = tokenize(tokenizer, prompts)
    torch.manual_seed(seed)
    head = torch.nn.Linear(text_encoder.config.hidden_size, 10)
    params = list(text_encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    text_encoder.train()
    acc = 0.0
    for _ in _progress(range(steps), "text encoder", quiet):
        logits = head(text_encoder(ids)[0].mean(dim=1))
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1) == labels).float().mean().item()
    text_encoder.eval().requires_grad_(False)
    return acc


# ------------------------------------------------------------------------------------------------ vae


def build_vae(seed):
    from yoso.testing import make_vae

    # scaling_factor 1.0 for now: base_model sets the real one from the trained latents' std.
    return make_vae(seed, D.RESOLUTION, VAE_CHANNELS, scaling_factor=1.0).train()


def train_vae(vae, images, steps, batch_size, lr, kl_weight, seed, quiet=False, device="cpu"):
    """Train on ``images`` ([N, 3, 64, 64] in [-1, 1]); one-cycle learning rate. Returns the last losses."""
    vae.to(device)
    images = images.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae.train()
    stats = {}
    bar = _progress(range(steps), "autoencoder", quiet)
    for _ in bar:
        x = images[torch.randint(0, len(images), (batch_size,), generator=gen).to(device)]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        mse = (rec - x).pow(2).mean()
        l1 = (rec - x).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + l1 + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        stats = {"mse": mse.item(), "l1": l1.item(), "kl_per_element": kl.item()}
        bar.set_postfix(mse=f"{stats['mse']:.4f}", refresh=False)
    vae.eval().requires_grad_(False).to("cpu")
    return stats


@torch.no_grad()
def encode_images(vae, images, batch_size=256):
    """Posterior means and standard deviations (unscaled) of ``images``."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i : i + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode_latents(vae, latents, batch_size=250):
    """Scaled latents -> images in [-1, 1]."""
    out = [vae.decode(latents[i : i + batch_size] / vae.config.scaling_factor).sample for i in range(0, len(latents), batch_size)]
    return torch.cat(out).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------- unet


def build_unet(seed, channels=UNET_CHANNELS):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    channels = tuple(int(c) for c in channels)
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=D.RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]),
        up_block_types=tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=TEXT_CONFIG["hidden_size"],
        attention_head_dim=4,
        norm_num_groups=16,
    )


def train_unet(unet, latent_mean, latent_std, labels, text_embeddings, steps, batch_size, lr, caption_dropout,
               ema_decay, seed, quiet=False, device="cpu"):
    """SD1.5's training objective on the digit latents.

    ``latent_mean``/``latent_std``: scaled posterior moments of the training images (a fresh latent is drawn
    from the posterior each time, as SD's training does). ``text_embeddings``: [T*10 + 1, 77, C], the encoder
    outputs of ``data.all_prompts()`` followed by the empty prompt. Returns (EMA UNet, last losses).
    """
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(sd15_scheduler_config())
    n_templates = len(D.TEMPLATES)
    empty_index = text_embeddings.shape[0] - 1
    labels = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet.to(device)
    text_embeddings = text_embeddings.to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_params = list(ema.parameters())
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 20)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    unet.train()
    stats = {}
    avg = None
    bar = _progress(range(steps), "unet", quiet)
    for step in bar:
        idx = torch.randint(0, len(latent_mean), (batch_size,), generator=gen)
        z0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        template = torch.randint(0, n_templates, (batch_size,), generator=gen)
        prompt_index = template * 10 + labels[idx]
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        prompt_index = torch.where(drop, torch.full_like(prompt_index, empty_index), prompt_index)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        zt = noise_scheduler.add_noise(z0, noise, t)
        zt, t, noise, prompt_index = zt.to(device), t.to(device), noise.to(device), prompt_index.to(device)
        pred = unet(zt, t, text_embeddings[prompt_index]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        stats = {"loss_ema": avg}
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
    unet.eval().requires_grad_(False).to("cpu")
    return ema.to("cpu"), stats


# ---------------------------------------------------------------------------------------------- saving


def save_pipeline(path, vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    from yoso.testing import write_clip_vocab_files

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    write_clip_vocab_files(path / "tokenizer")
    return str(path)


def save_teacher(base_dir, teacher_dir):
    """The teacher folder: the base folder's files (hard links where the file system allows, else copies)
    with ``scheduler/`` replaced by a DPM-Solver++ config. Loadable with ``AutoPipelineForText2Image``."""
    from diffusers import DPMSolverMultistepScheduler

    base_dir, teacher_dir = Path(base_dir), Path(teacher_dir)
    if teacher_dir.exists():
        shutil.rmtree(teacher_dir)
    for src in base_dir.rglob("*"):
        if src.is_dir() or src.relative_to(base_dir).parts[0] == "scheduler":
            continue
        dst = teacher_dir / src.relative_to(base_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    DPMSolverMultistepScheduler.from_config(sd15_scheduler_config()).save_pretrained(teacher_dir / "scheduler")
    index = json.loads((teacher_dir / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DPMSolverMultistepScheduler"]
    (teacher_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return str(teacher_dir)


# ------------------------------------------------------------------------------------------------ stage


def train_base_model(out_dir, budget, seed=0, quiet=False, device="cpu"):
    """Train the text encoder, autoencoder and UNet with ``budget`` (a dict, see run.py); save
    ``out_dir/base`` and ``out_dir/teacher``; return a summary dict (also written to ``base_model.json``)."""
    from diffusers import PNDMScheduler

    from yoso.testing import make_clip_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"budget": dict(budget), "seed": seed, "seconds": {}}
    train_x, train_y, _, _ = D.load_split()
    images = D.upscale(train_x)

    t0 = time.time()
    tokenizer = make_clip_tokenizer()
    text_encoder = build_text_encoder(seed + 1)
    summary["text_encoder_train_accuracy"] = pretrain_text_encoder(
        text_encoder, tokenizer, budget["text_steps"], budget["text_lr"], seed + 1, quiet)
    with torch.no_grad():
        text_embeddings = text_encoder(tokenize(tokenizer, D.all_prompts() + [""]))[0]
    summary["seconds"]["text_encoder"] = time.time() - t0

    t0 = time.time()
    vae = build_vae(seed + 2)
    summary["vae_final_losses"] = train_vae(vae, images, budget["vae_steps"], budget["vae_batch"], budget["vae_lr"],
                                            budget["vae_kl_weight"], seed + 2, quiet, device)
    mean, std = encode_images(vae, images)
    gen = torch.Generator().manual_seed(seed + 3)
    sample = mean + std * torch.randn(mean.shape, generator=gen)
    scaling = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling)
    summary["vae_scaling_factor"] = scaling
    summary["seconds"]["vae"] = time.time() - t0

    t0 = time.time()
    unet = build_unet(seed + 4, budget.get("unet_channels", UNET_CHANNELS))
    ema_unet, summary["unet_final_losses"] = train_unet(
        unet, mean * scaling, std * scaling, train_y, text_embeddings, budget["unet_steps"], budget["unet_batch"],
        budget["unet_lr"], budget["caption_dropout"], budget["unet_ema_decay"], seed + 4, quiet, device)
    summary["seconds"]["unet"] = time.time() - t0
    summary["parameters"] = {
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "unet": sum(p.numel() for p in ema_unet.parameters()),
    }

    base_dir = save_pipeline(out_dir / "base", vae, text_encoder, tokenizer, ema_unet,
                             PNDMScheduler.from_config(sd15_scheduler_config()))
    teacher_dir = save_teacher(base_dir, out_dir / "teacher")
    summary["base_dir"], summary["teacher_dir"] = base_dir, teacher_dir
    (out_dir / "base_model.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
