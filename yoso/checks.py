"""Checks that run before any model weights load: each problem is one line naming the flag and the fix.

They read only configuration files (a few KB, also for hub ids), so a typo costs seconds, not the
minutes of loading SD1.5 and SD-Turbo onto GPUs.
"""

import importlib.util
import os
import warnings
from pathlib import Path

from .data import read_prompts
from .lora import unmatched_targets


class ArgumentError(ValueError):
    """A bad command-line value; the message is one line naming the flag."""


def _looks_local(path):
    # A hub id is "name" or "org/name"; anything else (absolute, relative with ./, deeper) is a folder.
    text = str(path)
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or os.path.sep != "/" and os.path.sep in text


def load_model_config(flag, path, subfolder, config_class, revision=None, cache_dir=None):
    """The config of ``path/subfolder`` (a local folder or a hub id), or an ArgumentError naming ``flag``."""
    if _looks_local(path) or os.path.exists(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ArgumentError(f"{flag} {path}: no such folder (give a diffusers model folder or a hub id)")
        if not (folder / subfolder / "config.json").is_file():
            raise ArgumentError(f"{flag} {path}: no {subfolder}/config.json there; is it a diffusers pipeline folder?")
    try:
        with warnings.catch_warnings():  # hub-client deprecation chatter would bury the one-line error
            warnings.simplefilter("ignore")
            return config_class.load_config(str(path), subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except Exception as error:  # the hub client raises many types; all mean "cannot get it"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ArgumentError(f"{flag} {path}: cannot read {subfolder}/config.json locally or from the Hub ({reason})") from None


def vae_scale_factor(vae_config):
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def unet_downsampling(unet_config):
    return 2 ** (len(unet_config["down_block_types"]) - 1)


def check_resolution(resolution, base_vae, base_unet, which="the base model"):
    factor = vae_scale_factor(base_vae) * unet_downsampling(base_unet)
    if resolution <= 0 or resolution % factor:
        raise ArgumentError(
            f"--resolution {resolution}: {which} needs a multiple of {factor} "
            f"(VAE factor {vae_scale_factor(base_vae)} x UNet downsampling {unet_downsampling(base_unet)}), e.g. "
            f"{max(factor, round(resolution / factor) * factor)}"
        )


def check_teacher_latents(base_vae, base_unet, teacher_vae, teacher_unet):
    base = (base_unet["in_channels"], vae_scale_factor(base_vae))
    teacher = (teacher_vae["latent_channels"], vae_scale_factor(teacher_vae))
    if base != teacher or teacher_unet["in_channels"] != teacher[0]:
        raise ArgumentError(
            f"--pretrained_teacher_model makes latents of {teacher[0]} channels at 1/{teacher[1]} resolution, the base UNet "
            f"takes {base[0]} channels at 1/{base[1]}: the teacher must share the base model's latent space (as SD-Turbo does SD1.5's)"
        )


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


def preflight(args):
    """Run every check; return the prompts read from ``--train_data`` (so they are read once)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    check_optional_packages(args)
    check_output_dir(args.output_dir)
    if args.gradient_accumulation_steps < 1 or args.train_batch_size < 1:
        raise ArgumentError("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    if args.max_train_steps is None and args.num_train_epochs is None:
        raise ArgumentError("give --max_train_steps or --num_train_epochs")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            raise ArgumentError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder "
                                "(use 'latest' or a checkpoint-<step> folder)")
    prompts = read_prompts(args.train_data, args.caption_column, args.max_train_samples)

    base, teacher = args.pretrained_model_name_or_path, args.pretrained_teacher_model
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    base_unet = load_model_config("--pretrained_model_name_or_path", base, "unet", UNet2DConditionModel, **common)
    base_vae = load_model_config("--pretrained_model_name_or_path", base, "vae", AutoencoderKL, **common)
    teacher_unet = load_model_config("--pretrained_teacher_model", teacher, "unet", UNet2DConditionModel, cache_dir=args.cache_dir)
    teacher_vae = load_model_config("--pretrained_teacher_model", teacher, "vae", AutoencoderKL, cache_dir=args.cache_dir)
    check_resolution(args.resolution, base_vae, base_unet)
    check_resolution(args.resolution, teacher_vae, teacher_unet, which="the teacher")
    check_teacher_latents(base_vae, base_unet, teacher_vae, teacher_unet)
    check_lora_targets(base_unet, args.lora_target_modules)
    return prompts
