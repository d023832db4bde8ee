#!/usr/bin/env python
"""Precompute the teacher's latents once, for ``train_yoso_lora.py --teacher_latent_cache``.

    accelerate launch precompute_teacher_latents.py --pretrained_teacher_model stabilityai/sd-turbo \
        --train_data train_anno.jsonl --resolution 512 --seed 0 --num_epochs 1 --output_dir teacher_cache

Use the same --train_data / --caption_column / --max_train_samples, --pretrained_model_name_or_path,
--pretrained_teacher_model, --teacher_vae, --teacher_latent_transcode, --resolution, --teacher_num_inference_steps,
--teacher_guidance_scale, --seed, --train_batch_size and --mixed_precision as the training run: the latent of
prompt i in epoch e comes from the noise seeded by (seed, e, i), exactly as on-the-fly training draws it, and
the teacher sees the same batches (train_yoso_lora.py refuses a cache whose teacher, latent route, resolution,
teacher settings, seed or prompts differ; another batch size or precision only warns). The cache holds latents
in the base model's latent space: a teacher in another one (SDXL-Turbo) is transcoded (yoso/latent_space.py).
Several processes split the shards between them; rerunning skips finished shards (resumes an interrupted run,
or extends a cache to more epochs). The layout is in yoso/latent_cache.py.
"""

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Precompute teacher latents for train_yoso_lora.py --teacher_latent_cache.")
    p.add_argument("--pretrained_teacher_model", default="stabilityai/sd-turbo")
    p.add_argument("--pretrained_model_name_or_path", default="runwayml/stable-diffusion-v1-5",
                   help="The training run's base model: its VAE defines the latent space the cache holds.")
    p.add_argument("--revision", default=None, help="Revision of the base model on the Hub.")
    p.add_argument("--variant", default=None, help="Weight variant of the base model files, e.g. fp16.")
    p.add_argument("--teacher_vae", default=None, metavar="PATH",
                   help="AutoencoderKL (folder or hub id) that decodes the teacher's latents when transcoding, e.g. "
                        "madebyollin/sdxl-vae-fp16-fix for SDXL-Turbo in fp16. Default: the teacher's own vae/.")
    p.add_argument("--teacher_latent_transcode", default="auto", choices=["auto", "always", "never"],
                   help="Decode the teacher's latents by its VAE and re-encode them by the base's: auto (when the two "
                        "VAE configs differ, e.g. SDXL-Turbo), always, or never.")
    p.add_argument("--cache_dir", default=None, help="Where downloaded models are cached.")
    p.add_argument("--train_data", default="train_anno.jsonl")
    p.add_argument("--caption_column", default="prompt")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--teacher_num_inference_steps", type=int, default=1)
    p.add_argument("--teacher_guidance_scale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="The training run's --seed.")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="The training run's --mixed_precision (the teacher's dtype). Default: accelerate's config.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_epochs", type=int, default=1, help="Epochs of latents; training cycles through them.")
    p.add_argument("--shard_size", type=int, default=4096,
                   help="Prompts per shard file (rounded down to a multiple of --train_batch_size).")
    p.add_argument("--train_batch_size", type=int, default=16,
                   help="Prompts per teacher call: the training run's --train_batch_size makes the cached latents "
                        "bit-identical to on-the-fly ones (any other value: equal up to rounding).")
    return p.parse_args(argv)


def refuse(error):
    """A bad input: one line on stderr, exit status 2 (argparse's convention)."""
    print(f"precompute_teacher_latents.py: error: {error}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    args = parse_args(argv)
    from yoso.checks import ArgumentError
    from yoso.data import PromptFileError, read_prompts
    from yoso.latent_cache import ROUTE_DEFAULTS, LatentCacheError, make_cache_settings, read_cache_info
    from yoso.latent_space import teacher_latent_plan

    try:
        if args.num_epochs < 1 or args.shard_size < 1 or args.train_batch_size < 1:
            raise ArgumentError("--num_epochs, --shard_size and --train_batch_size must be at least 1")
        args.shard_size = max(args.shard_size // args.train_batch_size, 1) * args.train_batch_size
        prompts = read_prompts(args.train_data, args.caption_column, args.max_train_samples)
        plan = teacher_latent_plan(args)
        settings = make_cache_settings(args.pretrained_teacher_model, args.resolution, plan.latent_shape,
                                       args.teacher_num_inference_steps, args.teacher_guidance_scale, args.seed, prompts,
                                       plan.transcode, args.teacher_vae, args.pretrained_model_name_or_path)
        try:
            existing = read_cache_info(args.output_dir, flag="--output_dir")
        except LatentCacheError:
            existing = None
        if existing is not None and (any(existing.get(k, ROUTE_DEFAULTS.get(k)) != v for k, v in settings.items())
                                     or existing["shard_size"] != args.shard_size
                                     or existing["batch_size"] != args.train_batch_size):
            raise ArgumentError(f"--output_dir {args.output_dir} holds a cache made with other settings; "
                                "use an empty --output_dir for a new cache")
        if existing is not None and existing["num_epochs"] > args.num_epochs:
            args.num_epochs = existing["num_epochs"]  # extending never shrinks a cache
    except (ArgumentError, PromptFileError, LatentCacheError) as error:
        refuse(error)

    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from yoso.latent_cache import LatentCacheError, num_shards, precompute_latents, text_dtype, write_cache_info
    from yoso.teacher import load_teacher_latents

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    noise_dtype = text_dtype(accelerator.autocast, accelerator.device, weight_dtype)
    if accelerator.is_main_process:
        print(f"precompute_teacher_latents.py: {plan.reason}")
    latent_source = load_teacher_latents(args.pretrained_teacher_model, args.pretrained_model_name_or_path, weight_dtype,
                                         accelerator.device, args.teacher_num_inference_steps, args.teacher_guidance_scale,
                                         plan.transcode, args.teacher_vae, args.revision, args.variant, args.cache_dir)

    per_epoch = num_shards(len(prompts), args.shard_size)
    mine = len(range(accelerator.process_index, per_epoch * args.num_epochs, accelerator.num_processes))
    bar = tqdm(total=mine * args.shard_size, unit="prompt", disable=not accelerator.is_local_main_process,
               desc=f"teacher latents ({per_epoch * args.num_epochs} shards, {accelerator.num_processes} processes)")
    try:
        precompute_latents(args.output_dir, latent_source, prompts, settings, args.num_epochs, args.shard_size,
                           args.train_batch_size, accelerator.process_index, accelerator.num_processes, accelerator.device,
                           noise_dtype, accelerator.autocast, progress=bar.update)
    except LatentCacheError as error:
        refuse(error)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors import safe_open

        from yoso.latent_cache import shard_file_name

        with safe_open(f"{args.output_dir}/{shard_file_name(0, 0)}", framework="pt") as f:
            latent_dtype = f.get_slice("latents")[0:1].dtype
        info = write_cache_info(args.output_dir, settings, args.num_epochs, args.shard_size, args.train_batch_size,
                                latent_dtype, noise_dtype, accelerator.mixed_precision)
        print(f"teacher-latent cache: {args.output_dir} ({info['num_prompts']} prompts x {info['num_epochs']} epochs, "
              f"{info['dtype']} latents {tuple(info['latent_shape'])})")
    accelerator.wait_for_everyone()
    del latent_source
    accelerator.end_training()


if __name__ == "__main__":
    main()
