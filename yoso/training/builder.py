"""Building a training run: from one settings object to everything ``YOSOTrainingStep`` needs.

One builder serves ``train_yoso_lora.py``, the tests and the benchmarks, so all three train exactly the
same thing. ``RunSettings`` holds the settings by the training script's flag names, so it is built from
the parsed arguments by name; the benchmarks and tests build it with keywords.

    settings = RunSettings.from_args(args)
    run = build_run(settings, accelerator, num_training_steps=max_train_steps)
    logs = run.trainer.step(batch, generator)
"""

from dataclasses import dataclass, field, fields

import torch

from yoso.method.lora import DEFAULT_TARGET_MODULES
from yoso.method.losses import YOSOLossConfig
from yoso.utils.precision import weight_dtype_for


@dataclass(kw_only=True)
class RunSettings:
    # Models
    pretrained_model_name_or_path: str
    pretrained_teacher_model: str | None = None  # None: the latents come from elsewhere (a cache)
    teacher_latent_cache: str | None = None  # set: the teacher is not loaded
    teacher_vae: str | None = None
    transcode_teacher_latents: bool = False  # the preflight's decision (yoso.data.latent_space.TeacherLatentPlan)
    revision: str | None = None
    variant: str | None = None
    cache_dir: str | None = None
    prediction_type: str | None = None
    resolution: int = 512
    teacher_num_inference_steps: int = 1
    teacher_guidance_scale: float = 0.0
    enable_xformers_memory_efficient_attention: bool = False
    # LoRA and EMA
    lora_rank: int = 64
    lora_alpha: float = 8
    lora_target_modules: tuple = DEFAULT_TARGET_MODULES
    init_lora_weights: str = "default"
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 2 / 3
    # Losses (SPEC section 2)
    lambda_con: float = 2.0
    lambda_kl: float = 0.5
    lambda_adv: float = 1.0
    snr_gamma: float = 5.0
    coop_gap: int = 250
    consistency_gap: int = 25
    gan_loss_reduction: str = "batch"
    kl_weighting: str = "batch"
    consistency_loss: str = "lpl"
    kl_loss: str = "mse"
    # Noise and the update
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 20
    seed: int = 0
    # Optimizers and the learning-rate schedule
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    discriminator_learning_rate: float | None = None
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    adam_fused: str = "auto"  # "auto": fused AdamW on CUDA; "on" / "off"
    # Speed and memory: the same math, another schedule of the work (yoso.method.step's docstring)
    step_order: str = "generator_first"
    discriminator_chunks: int = 1
    generator_chunks: int = 1
    torch_compile: bool = False
    torch_compile_backend: str = "inductor"
    channels_last: bool = False
    # F's and D's parts of G's loss backpropagated to pred as soon as they exist (always on in the script: the
    # same gradients, never more memory; off only to compare, in tests and benchmarks)
    staged_backward: bool = True
    share_autocast_casts: bool = True  # not a flag either: off only to compare (yoso/utils/precision.py)

    @classmethod
    def from_args(cls, args, **overrides):
        """The settings named like the parsed arguments' attributes; ``overrides`` by keyword."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values)

    @property
    def loads_teacher(self):
        return self.pretrained_teacher_model is not None and not self.teacher_latent_cache

    def loss_config(self):
        return YOSOLossConfig(**{f.name: getattr(self, f.name) for f in fields(YOSOLossConfig)})

    def learning_rates(self, num_processes):
        """(G's, D's) learning rates; ``--scale_lr`` multiplies both by accumulation x batch x processes."""
        scale = self.gradient_accumulation_steps * self.train_batch_size * num_processes if self.scale_lr else 1
        return self.learning_rate * scale, (self.discriminator_learning_rate or self.learning_rate) * scale


@dataclass(kw_only=True)
class TrainingRun:
    """What a run trains with. ``unet`` / ``discriminator`` are what ``accelerator.prepare`` returned
    (DDP-wrapped when distributed); ``*_module`` are the plain modules."""

    settings: RunSettings
    accelerator: object
    models: object  # yoso.training.models.YOSOModels
    unet: torch.nn.Module
    discriminator: torch.nn.Module
    unet_module: torch.nn.Module
    discriminator_module: torch.nn.Module
    optimizer_g: object
    optimizer_d: object
    lr_scheduler: object
    ema: object  # yoso.method.ema.LoRAEMA or None
    trainer: object  # yoso.method.step.YOSOTrainingStep
    checkpointed: list = field(default_factory=list)  # objects with state_dict(), beyond models and optimizers


ADAM_FUSED = ("auto", "on", "off")


def fused_adamw(adam_fused, device, use_8bit_adam=False):
    """Whether torch's AdamW runs its fused kernel (one kernel for the whole update instead of a few per
    tensor list; the same AdamW update, to float rounding): "auto" on CUDA, never with bitsandbytes."""
    if adam_fused not in ADAM_FUSED:
        raise ValueError(f"--adam_fused must be one of {ADAM_FUSED}, got {adam_fused!r}")
    if use_8bit_adam:
        if adam_fused == "on":
            raise ValueError("--adam_fused on: bitsandbytes' AdamW8bit (--use_8bit_adam) has no fused variant; drop one")
        return False
    return adam_fused == "on" or (adam_fused == "auto" and torch.device(device).type == "cuda")


def make_optimizers(unet, discriminator, *, lr_g, lr_d, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                    use_8bit_adam=False, fused=False):
    """AdamW for the LoRA and AdamW with beta1 = 0 for D, as in the paper; ``use_8bit_adam``: bitsandbytes'
    AdamW8bit for both (as released; D's Adam state, over a copy of the UNet's encoder half, is the largest);
    ``fused``: torch's fused AdamW kernel for both (see ``fused_adamw``)."""
    import functools

    from yoso.method.lora import lora_named_parameters

    if use_8bit_adam:
        import bitsandbytes as bnb

        adamw = bnb.optim.AdamW8bit
    else:
        adamw = functools.partial(torch.optim.AdamW, fused=True) if fused else torch.optim.AdamW
    optimizer_g = adamw([p for _, p in lora_named_parameters(unet)], lr=lr_g, betas=betas,
                        weight_decay=weight_decay, eps=eps)
    optimizer_d = adamw(discriminator.parameters(), lr=lr_d, betas=(0.0, betas[1]), weight_decay=weight_decay, eps=eps)
    return optimizer_g, optimizer_d


# Regional compilation: the blocks a UNet repeats, each compiled on its own (a handful of distinct graphs
# instead of one huge one); the LoRA layers inside them compile with them.
COMPILED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")


def compile_repeated_blocks(models, backend="inductor"):
    """``torch.compile`` every resnet and transformer block of G (so F, which runs G's blocks, too) and of D's
    encoder, in place (``nn.Module.compile``: parameter names and state dicts stay as they are). The teacher
    stays eager (one pass without gradient, and none with a latent cache). Returns the number of blocks."""
    import torch._dynamo

    # One block class meets many shapes (channels, resolution, batch B / 2B / 3B) and several modes (gradient on
    # or off, the LoRA off in F, D's weights trainable or frozen). With static shapes every channel count would be
    # a graph of its own (parameters included), several dozen for SD1.5: compile shapes as symbols instead, so
    # that only the modes make graphs, and let dynamo keep more than its default 8 per function.
    torch._dynamo.config.force_parameter_static_shapes = False
    torch._dynamo.config.force_nn_module_property_static_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    count = 0
    for model in (models.unet, models.discriminator):
        for module in model.modules():
            if type(module).__name__ in COMPILED_BLOCKS:
                module.compile(backend=backend, dynamic=True)
                count += 1
    return count


def use_channels_last(models):
    """Frozen conv weights of G (and so F) in channels-last layout; the step hands G and D channels-last inputs,
    so their convs run channels-last. Trainable tensors (the LoRA, D) keep the default layout: safetensors
    (the saved LoRA, checkpoints) takes only contiguous tensors, and under mixed precision they are cast
    (copied) for each use anyway."""
    with torch.no_grad():
        for p in models.unet.parameters():
            if p.dim() == 4 and not p.requires_grad:
                p.data = p.data.contiguous(memory_format=torch.channels_last)


def build_run(settings, accelerator, *, num_training_steps, parts=None, weight_dtype=None, timer=None):
    """Models (loaded from ``settings``' paths, or assembled from ``parts``: a ``yoso.training.models.ModelParts``
    built elsewhere, e.g. the benchmarks' config-built random weights), optimizers, lr schedule, EMA, prepared
    by ``accelerator``, and the training step. ``weight_dtype``: the frozen weights' dtype (default: the
    accelerator's mixed precision)."""
    from diffusers.optimization import get_scheduler

    from yoso.method.ema import LoRAEMA
    from yoso.method.lora import lora_named_parameters
    from yoso.training.models import assemble_models, load_model_parts
    from yoso.method.step import YOSOTrainingStep, no_timer

    weight_dtype = weight_dtype or weight_dtype_for(accelerator)
    if parts is None:
        parts = load_model_parts(settings, accelerator.device, weight_dtype)
    models = assemble_models(parts, settings, device=accelerator.device, weight_dtype=weight_dtype)

    if settings.channels_last:
        use_channels_last(models)
    if settings.torch_compile:
        compile_repeated_blocks(models, backend=settings.torch_compile_backend)

    lr_g, lr_d = settings.learning_rates(accelerator.num_processes)
    optimizer_g, optimizer_d = make_optimizers(
        models.unet, models.discriminator, lr_g=lr_g, lr_d=lr_d, betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon, use_8bit_adam=settings.use_8bit_adam,
        fused=fused_adamw(settings.adam_fused, accelerator.device, settings.use_8bit_adam))
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    world = accelerator.num_processes
    lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer=optimizer_g,
                                 num_warmup_steps=settings.lr_warmup_steps * world,
                                 num_training_steps=num_training_steps * world)
    unet, discriminator, optimizer_g, optimizer_d, lr_scheduler = accelerator.prepare(
        models.unet, models.discriminator, optimizer_g, optimizer_d, lr_scheduler)
    unet_module = accelerator.unwrap_model(unet)
    ema = LoRAEMA(lora_named_parameters(unet_module), settings.ema_decay, warmup=settings.ema_warmup,
                  inv_gamma=settings.ema_inv_gamma, power=settings.ema_power) if settings.use_ema else None
    trainer = YOSOTrainingStep(
        accelerator, unet=unet, discriminator=discriminator, feature_net=models.feature_net,
        text_encoder=models.text_encoder, latent_source=models.latent_source, schedule=models.schedule,
        optimizer_g=optimizer_g, optimizer_d=optimizer_d, lr_scheduler=lr_scheduler, ema=ema,
        loss_config=settings.loss_config(), latent_shape=models.latent_shape, seed=settings.seed,
        teacher_noise_shape=models.teacher_noise_shape, noise_offset=settings.noise_offset,
        input_perturbation=settings.input_perturbation,
        max_grad_norm=settings.max_grad_norm, max_nonfinite_steps=settings.max_nonfinite_steps,
        step_order=settings.step_order, discriminator_chunks=settings.discriminator_chunks,
        generator_chunks=settings.generator_chunks,
        channels_last=settings.channels_last, staged_backward=settings.staged_backward, timer=timer or no_timer)
    return TrainingRun(settings=settings, accelerator=accelerator, models=models, unet=unet,
                       discriminator=discriminator, unet_module=unet_module,
                       discriminator_module=accelerator.unwrap_model(discriminator), optimizer_g=optimizer_g,
                       optimizer_d=optimizer_d, lr_scheduler=lr_scheduler, ema=ema, trainer=trainer)
