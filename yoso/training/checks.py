"""Checks that run before any model weights load: each problem is one line naming the flag and the fix.

They read only configuration files (a few KB, also for hub ids), so a typo costs seconds, not the
minutes of loading SD1.5 and SD-Turbo onto GPUs.
"""

import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

from yoso.data.prompts import read_prompts
from yoso.method.lora import unmatched_targets
from yoso.utils.model_configs import ArgumentError, check_resolution, load_model_config


def check_lora_targets(base_unet_config, target_modules):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    # Module names only: build the UNet on the meta device, no weights.
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(base_unet_config)
    missing = unmatched_targets((name for name, _ in unet.named_modules()), target_modules)
    if missing:
        raise ArgumentError(
            f"--lora_target_modules: {', '.join(missing)} match no module of the base UNet "
            "(names like to_q, to_out.0, conv1, time_emb_proj)"
        )
    return unet.config  # complete (diffusers' defaults filled in), as a loaded UNet's config is


def check_optional_packages(args):
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ArgumentError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                            "(CUDA only: pip install xformers, or drop the flag; PyTorch SDPA is the default)")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ArgumentError("--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes, or drop the flag)")
    if args.use_8bit_adam and getattr(args, "adam_fused", "auto") == "on":
        raise ArgumentError("--adam_fused on: bitsandbytes' AdamW8bit (--use_8bit_adam) has no fused variant; drop one of the two")


def check_output_dir(path):
    path = Path(path)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ArgumentError(f"--output_dir {path}: {existing} is not a writable folder")


class PreflightResult(NamedTuple):
    prompts: list | None  # read from --train_data (once); None when the run trains on images
    teacher_plan: object  # yoso.data.latent_space.TeacherLatentPlan (transcode or not); None with images


def launched_world_size():
    """The number of processes this run was launched with, from the launcher's environment (``accelerate
    launch`` / torchrun set WORLD_SIZE, MPI its own), as accelerate reads it; 1 when started alone."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def check_global_batch(num_prompts, args):
    world = launched_world_size()
    if num_prompts < args.train_batch_size * world:
        raise ArgumentError(
            f"--train_data holds {num_prompts} prompts, fewer than one global batch ({args.train_batch_size} "
            f"x {world} processes): lower --train_batch_size or add prompts")


def resolve_resume(args):
    """Resolve ``--resume_from_checkpoint`` (in place: ``train()`` reads the folder from it); returns the
    checkpoint folder, or None for a new run ('latest' with no checkpoint yet, or no flag)."""
    from yoso.training.checkpoint import INCOMPLETE_SUFFIX, resolve_checkpoint

    value = args.resume_from_checkpoint
    if not value:
        return None
    path, tried = resolve_checkpoint(value, args.output_dir)
    if value == "latest":
        if path is not None:
            args.resume_from_checkpoint = str(path)
        return path
    if path is None:
        raise ArgumentError(f"--resume_from_checkpoint {value}: no such checkpoint folder (looked at "
                            f"{' and '.join(map(str, dict.fromkeys(tried)))}; use 'latest' or a checkpoint-<step> "
                            "folder, by path or by its name in --output_dir)")
    if path.name.endswith(INCOMPLETE_SUFFIX):
        raise ArgumentError(f"--resume_from_checkpoint {value}: an unfinished checkpoint (its writing was interrupted); "
                            "use 'latest' or a complete checkpoint-<step> folder")
    args.resume_from_checkpoint = str(path)
    return path


def check_resume_settings(checkpoint, args, base_unet_config):
    """Refuse to resume ``checkpoint`` with settings it cannot be resumed with (see
    ``yoso.training.checkpoint.RESUME_FIXED_SETTINGS``); a checkpoint without a settings file is not checked."""
    from yoso.training.checkpoint import RESUME_FIXED_SETTINGS, read_run_settings, resume_conflicts

    record = read_run_settings(checkpoint)
    if record is None:
        return
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    given = {name: getattr(args, name) for name in RESUME_FIXED_SETTINGS}
    conflicts = resume_conflicts(record, checkpoint, given, base_unet_config, args.pretrained_model_name_or_path,
                                 mixed_precision)
    if conflicts:
        raise ArgumentError(conflicts[0])


def preflight(args):
    """Run every check; return what the run needs from them (:class:`PreflightResult`). Resolves
    ``args.resume_from_checkpoint`` to the checkpoint's path."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from yoso.data.image_data import check_image_data, resolve_caption_column, uses_image_data
    from yoso.data.latent_space import teacher_latent_plan

    check_optional_packages(args)
    check_output_dir(args.output_dir)
    if args.gradient_accumulation_steps < 1 or args.train_batch_size < 1:
        raise ArgumentError("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    if args.max_train_steps is None and args.num_train_epochs is None:
        raise ArgumentError("give --max_train_steps or --num_train_epochs")
    checkpoint = resolve_resume(args)
    images = uses_image_data(args)
    if images:  # with --teacher_latent_cache, an image cache of this data (check_cache_for_run)
        check_image_data(args)  # its row count is checked when the data opens (unknown until datasets prepares it)
        prompts = None
    else:
        prompts = read_prompts(args.train_data, resolve_caption_column(args), args.max_train_samples, args.seed)
        check_global_batch(len(prompts), args)

    base = args.pretrained_model_name_or_path
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    base_unet = load_model_config("--pretrained_model_name_or_path", base, "unet", UNet2DConditionModel, **common)
    base_vae = load_model_config("--pretrained_model_name_or_path", base, "vae", AutoencoderKL, **common)
    check_resolution(args.resolution, base_vae, base_unet)
    # The teacher makes x0 from prompts (in the base's latent space, or transcoded into it); with images the base VAE does.
    teacher_plan = None if images else teacher_latent_plan(args)
    base_unet_full = check_lora_targets(base_unet, args.lora_target_modules)
    if checkpoint is not None:
        check_resume_settings(checkpoint, args, base_unet_full)
    return PreflightResult(prompts, teacher_plan)
