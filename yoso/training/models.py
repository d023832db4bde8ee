"""Loading and preparing every model of a YOSO run (SPEC section 1), shared by the training script,
the tests and the benchmarks (through ``yoso.training.builder.build_run``) so that all three build exactly the same thing.

    G    base UNet + LoRA (LoRA trainable, fp32; base weights frozen, in the compute dtype)
    E    base CLIP text encoder + tokenizer (frozen)
    VAE  base VAE, only for validation images (frozen)
    T    teacher pipeline (frozen; skipped when training from cached latents or images), with a VAE
         transcoder into the base's latent space when its own differs (SDXL-Turbo)
    F    G's encoder half with the LoRA off (no extra weights)
    D    copy of the base UNet's encoder half + head (trainable, fp32)
"""

from dataclasses import dataclass

import torch

from yoso.method.discriminator import Discriminator
from yoso.method.lora import add_lora
from yoso.utils.precision import place, share_autocast_casts
from yoso.method.schedule import YOSOSchedule
from yoso.data.teacher import TeacherLatents, load_teacher_latents
from yoso.method.unet_encoder import FeatureNet


@dataclass(kw_only=True)
class ModelParts:
    """The loaded (or config-built) pieces a run is assembled from, before freezing, LoRA and placement."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    teacher_pipeline: object = None  # already placed on the device in the compute dtype; None: no teacher
    teacher_transcoder: object = None  # yoso.data.latent_space.LatentTranscoder when the teacher's latent space differs


@dataclass(kw_only=True)
class YOSOModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    discriminator: torch.nn.Module
    feature_net: FeatureNet
    noise_scheduler: object
    schedule: YOSOSchedule
    latent_source: object  # TeacherLatents, or None when the latents come from elsewhere (a cache)
    latent_shape: tuple
    teacher_noise_shape: tuple | None  # the teacher's own latent shape (its noise), None without a teacher
    weight_dtype: torch.dtype


def load_model_parts(settings, device, weight_dtype):
    """Load every model of ``settings`` (a ``yoso.training.builder.RunSettings``) from its folder or hub id. The teacher
    is skipped when ``settings.loads_teacher`` is false (cached latents)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = settings.pretrained_model_name_or_path
    hub = {"revision": settings.revision, "cache_dir": settings.cache_dir}
    weights = {"variant": settings.variant, **hub}
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **hub)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **weights)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **weights)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **weights)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **hub)
    teacher_pipeline = transcoder = None
    if settings.loads_teacher:
        latent_source = load_teacher_latents(
            settings.pretrained_teacher_model, base, weight_dtype, device,
            transcode=settings.transcode_teacher_latents, teacher_vae=settings.teacher_vae,
            revision=settings.revision, variant=settings.variant, cache_dir=settings.cache_dir)
        teacher_pipeline, transcoder = latent_source.pipeline, latent_source.transcoder
    return ModelParts(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                      noise_scheduler=noise_scheduler, teacher_pipeline=teacher_pipeline, teacher_transcoder=transcoder)


def assemble_models(parts, settings, *, device, weight_dtype):
    """Freeze, build D from the base weights, add the LoRA, place and cast: the same for loaded models and
    for the benchmarks' config-built ones."""
    from diffusers.training_utils import cast_training_params

    text_encoder, vae, unet = parts.text_encoder, parts.vae, parts.unet
    schedule = YOSOSchedule.from_scheduler(parts.noise_scheduler, settings.prediction_type)
    for frozen_model in (text_encoder, vae, unet):
        frozen_model.requires_grad_(False)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # before D copies the encoder, so D checkpoints too
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    discriminator = Discriminator(unet, settings.resolution, vae_scale)  # from the base weights, before the LoRA
    add_lora(unet, settings.lora_rank, settings.lora_alpha, settings.lora_target_modules, settings.init_lora_weights)

    # Frozen weights in the compute dtype; the LoRA and D train in fp32.
    place(unet, device, weight_dtype)
    cast_training_params(unet, dtype=torch.float32)
    text_encoder.to(device, dtype=weight_dtype)
    place(vae, device, weight_dtype)
    discriminator.to(device, dtype=torch.float32)
    if settings.share_autocast_casts:  # same values, fewer fp16 copies kept for backward under autocast
        share_autocast_casts(unet)
        share_autocast_casts(discriminator)

    teacher_pipeline = parts.teacher_pipeline
    latent_source = None
    if teacher_pipeline is not None:
        latent_source = TeacherLatents(teacher_pipeline, settings.teacher_num_inference_steps,
                                       settings.teacher_guidance_scale, parts.teacher_transcoder)
    if settings.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        if teacher_pipeline is not None:
            teacher_pipeline.enable_xformers_memory_efficient_attention()
        for module in discriminator.modules():
            if hasattr(module, "set_use_memory_efficient_attention_xformers"):
                module.set_use_memory_efficient_attention_xformers(True)

    latent_shape = (unet.config.in_channels, settings.resolution // vae_scale, settings.resolution // vae_scale)
    return YOSOModels(tokenizer=parts.tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                      discriminator=discriminator, feature_net=FeatureNet(unet), noise_scheduler=parts.noise_scheduler,
                      schedule=schedule, latent_source=latent_source, latent_shape=latent_shape,
                      teacher_noise_shape=latent_source.noise_shape(settings.resolution) if latent_source else None,
                      weight_dtype=weight_dtype)
