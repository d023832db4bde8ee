"""Loading and preparing every model of a YOSO run (SPEC section 1), shared by the training script,
the tests and the benchmarks so that all three build exactly the same thing.

    G    base UNet + LoRA (LoRA trainable, fp32; base weights frozen, in the compute dtype)
    E    base CLIP text encoder + tokenizer (frozen)
    VAE  base VAE, only for validation images (frozen)
    T    teacher pipeline (frozen; skipped when training from cached latents)
    F    G's encoder half with the LoRA off (no extra weights)
    D    copy of the base UNet's encoder half + head (trainable, fp32)
"""

from dataclasses import dataclass

import torch

from .discriminator import Discriminator
from .lora import DEFAULT_TARGET_MODULES, add_lora
from .schedule import YOSOSchedule
from .teacher import TeacherLatents, load_teacher
from .unet_encoder import FeatureNet


@dataclass
class YOSOModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    discriminator: torch.nn.Module
    feature_net: FeatureNet
    noise_scheduler: object
    schedule: YOSOSchedule
    latent_source: object  # TeacherLatents, or None when the latents come from a cache
    latent_shape: tuple
    weight_dtype: torch.dtype


def load_models(base, teacher, resolution, device, weight_dtype=torch.float32, lora_rank=64, lora_alpha=8,
                lora_target_modules=DEFAULT_TARGET_MODULES, gradient_checkpointing=False, prediction_type=None,
                teacher_num_inference_steps=1, teacher_guidance_scale=0.0, revision=None, variant=None,
                cache_dir=None, xformers=False):
    """Load every model from its folder or hub id and assemble them. ``teacher=None`` skips the teacher
    (cached latents)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    hub = {"revision": revision, "cache_dir": cache_dir}
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **hub)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", variant=variant, **hub)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", variant=variant, **hub)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=variant, **hub)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **hub)
    teacher_pipeline = None if teacher is None else load_teacher(teacher, weight_dtype, device, cache_dir=cache_dir)
    return assemble_models(tokenizer, text_encoder, vae, unet, noise_scheduler, teacher_pipeline, resolution, device,
                           weight_dtype, lora_rank, lora_alpha, lora_target_modules, gradient_checkpointing,
                           prediction_type, teacher_num_inference_steps, teacher_guidance_scale, xformers)


def assemble_models(tokenizer, text_encoder, vae, unet, noise_scheduler, teacher_pipeline, resolution, device,
                    weight_dtype=torch.float32, lora_rank=64, lora_alpha=8, lora_target_modules=DEFAULT_TARGET_MODULES,
                    gradient_checkpointing=False, prediction_type=None, teacher_num_inference_steps=1,
                    teacher_guidance_scale=0.0, xformers=False):
    """Freeze, build D from the base weights, add the LoRA, place and cast: the same for loaded models and
    for the benchmarks' config-built ones. ``teacher_pipeline`` is already on ``device`` (or None)."""
    from diffusers.training_utils import cast_training_params

    schedule = YOSOSchedule.from_scheduler(noise_scheduler, prediction_type)
    for frozen_model in (text_encoder, vae, unet):
        frozen_model.requires_grad_(False)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # before D copies the encoder, so D checkpoints too
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    discriminator = Discriminator(unet, resolution, vae_scale)  # from the base weights, before the LoRA
    add_lora(unet, lora_rank, lora_alpha, lora_target_modules)

    # Frozen weights in the compute dtype; the LoRA and D train in fp32.
    unet.to(device, dtype=weight_dtype)
    cast_training_params(unet, dtype=torch.float32)
    text_encoder.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    discriminator.to(device, dtype=torch.float32)

    latent_source = None
    if teacher_pipeline is not None:
        latent_source = TeacherLatents(teacher_pipeline, teacher_num_inference_steps, teacher_guidance_scale)
    if xformers:
        unet.enable_xformers_memory_efficient_attention()
        if teacher_pipeline is not None:
            teacher_pipeline.enable_xformers_memory_efficient_attention()
        for module in discriminator.modules():
            if hasattr(module, "set_use_memory_efficient_attention_xformers"):
                module.set_use_memory_efficient_attention_xformers(True)

    latent_shape = (unet.config.in_channels, resolution // vae_scale, resolution // vae_scale)
    return YOSOModels(tokenizer, text_encoder, vae, unet, discriminator, FeatureNet(unet), noise_scheduler, schedule,
                      latent_source, latent_shape, weight_dtype)


def make_optimizers(unet, discriminator, lr_g, lr_d, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, use_8bit_adam=False):
    """AdamW for the LoRA (or bitsandbytes' AdamW8bit) and AdamW with beta1 = 0 for D, as in the paper."""
    from .lora import lora_named_parameters

    if use_8bit_adam:
        import bitsandbytes as bnb

        adamw = bnb.optim.AdamW8bit
    else:
        adamw = torch.optim.AdamW
    optimizer_g = adamw([p for _, p in lora_named_parameters(unet)], lr=lr_g, betas=betas,
                        weight_decay=weight_decay, eps=eps)
    optimizer_d = torch.optim.AdamW(discriminator.parameters(), lr=lr_d, betas=(0.0, betas[1]),
                                    weight_decay=weight_decay, eps=eps)
    return optimizer_g, optimizer_d
