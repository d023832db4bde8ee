#!/usr/bin/env python
"""Precompute the teacher's latents (or the base VAE's latents of images) once, for
``train_yoso_lora.py --teacher_latent_cache``.

    accelerate launch precompute_teacher_latents.py --pretrained_teacher_model stabilityai/sd-turbo \
        --train_data train_anno.jsonl --resolution 512 --seed 0 --num_train_epochs 1 --output_dir teacher_cache

Use the same --train_data / --caption_column / --max_train_samples, --pretrained_model_name_or_path,
--pretrained_teacher_model, --teacher_vae, --teacher_latent_transcode, --resolution, --teacher_num_inference_steps,
--teacher_guidance_scale, --seed, --train_batch_size and --mixed_precision as the training run: the latent of
prompt i in epoch e comes from the noise seeded by (seed, e, i), exactly as on-the-fly training draws it, and
the teacher sees the same batches (train_yoso_lora.py refuses a cache whose teacher, latent route, resolution,
teacher settings, seed or prompts differ; another batch size or precision only warns). The cache holds latents
in the base model's latent space: a teacher in another one (SDXL-Turbo) is transcoded (yoso/data/latent_space.py).
Several processes split the shards between them; rerunning skips finished shards (resumes an interrupted run,
or extends a cache to more epochs). The layout is in yoso/data/latent_cache.py.

With images (--train_data_dir or --dataset_name, map-style: an imagefolder with a metadata.jsonl, a hub or local
dataset without --streaming) it writes the base VAE's latents of the images instead, with their captions:

    accelerate launch precompute_teacher_latents.py --train_data_dir images --resolution 512 --random_flip \
        --seed 0 --train_batch_size 16 --num_train_epochs 2 --output_dir image_cache

Use the training run's data flags (--train_data_dir / --dataset_name / --dataset_config_name / --image_column /
--caption_column / --max_train_samples), --center_crop / --random_flip, --resolution, --seed,
--pretrained_model_name_or_path, --train_batch_size and --mixed_precision: the latent at position p of epoch e is
the one training computes for that slot (the same crop, flip, caption choice and VAE noise of (seed, e, id)), so
``train_yoso_lora.py --train_data_dir images ... --teacher_latent_cache image_cache`` trains exactly as on the fly
without reading, decoding or encoding an image. The --teacher_* flags do not apply. Streamed data (tar shards,
--streaming) is refused: a cache needs an epoch order it can index.
"""

import argparse
import sys


def build_parser():
    from yoso.training.cli import HelpFormatter, OneLineErrorParser, add_data_arguments, add_model_arguments, add_teacher_arguments

    p = OneLineErrorParser(prog="precompute_teacher_latents.py", formatter_class=HelpFormatter,
                           description="Precompute teacher latents (or the base VAE's latents of images) for "
                                       "train_yoso_lora.py --teacher_latent_cache. The model, data and teacher flags "
                                       "are the training script's, with the same meaning: give the training run's values.")
    add_model_arguments(p)
    add_data_arguments(p)
    add_teacher_arguments(p)
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="Threads that decode images.")
    p.add_argument("--seed", type=int, default=0, help="The training run's --seed.")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="The training run's --mixed_precision (the teacher's dtype; default: accelerate's config).")
    p.add_argument("--output_dir", required=True, help="The cache folder (created; an unfinished one is resumed).")
    p.add_argument("--num_train_epochs", type=int, default=1, help="Epochs of latents; training cycles through them.")
    p.add_argument("--num_epochs", dest="num_train_epochs", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the former name, still accepted
    p.add_argument("--shard_size", type=int, default=4096,
                   help="Prompts or images per shard file (rounded down to a multiple of --train_batch_size).")
    p.add_argument("--train_batch_size", type=int, default=16,
                   help="Prompts per teacher call, or images per VAE call: the training run's --train_batch_size "
                        "makes the cached latents bit-identical to on-the-fly ones (any other value: equal up to rounding).")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def refuse(error):
    """A bad input: one line on stderr, exit status 2 (argparse's convention)."""
    from yoso.training.cli import BAD_INPUT

    print(f"precompute_teacher_latents.py: error: {error}", file=sys.stderr)
    sys.exit(BAD_INPUT)


def check_existing_cache(args, settings):
    """An --output_dir holding a cache made with other settings is refused; one with more epochs keeps them."""
    from yoso.utils.model_configs import ArgumentError
    from yoso.data.latent_cache import LatentCacheError, read_cache_info, settings_differ

    try:
        existing = read_cache_info(args.output_dir, flag="--output_dir")
    except LatentCacheError:
        return
    if settings_differ(existing, settings) or existing["shard_size"] != args.shard_size \
            or existing["batch_size"] != args.train_batch_size:
        raise ArgumentError(f"--output_dir {args.output_dir} holds a cache made with other settings; "
                            "use an empty --output_dir for a new cache")
    args.num_train_epochs = max(args.num_train_epochs, existing["num_epochs"])  # extending never shrinks a cache


def check_sizes(args):
    from yoso.utils.model_configs import ArgumentError

    if args.num_train_epochs < 1 or args.shard_size < 1 or args.train_batch_size < 1:
        raise ArgumentError("--num_train_epochs, --shard_size and --train_batch_size must be at least 1")
    args.shard_size = max(args.shard_size // args.train_batch_size, 1) * args.train_batch_size


def main(argv=None):
    args = parse_args(argv)
    from yoso.data.image_data import uses_image_data

    if uses_image_data(args):
        return main_images(args)
    from yoso.utils.model_configs import ArgumentError
    from yoso.data.prompts import PromptFileError, read_prompts
    from yoso.data.image_data import resolve_caption_column
    from yoso.data.latent_cache import LatentCacheError, make_cache_settings
    from yoso.data.latent_space import teacher_latent_plan

    try:
        check_sizes(args)
        prompts = read_prompts(args.train_data, resolve_caption_column(args), args.max_train_samples, args.seed)
        plan = teacher_latent_plan(args)
        settings = make_cache_settings(args.pretrained_teacher_model, args.resolution, plan.latent_shape,
                                       args.teacher_num_inference_steps, args.teacher_guidance_scale, args.seed, prompts,
                                       plan.transcode, args.teacher_vae, args.pretrained_model_name_or_path)
        check_existing_cache(args, settings)
    except (ArgumentError, PromptFileError, LatentCacheError) as error:
        refuse(error)

    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from yoso.data.latent_cache import num_shards, precompute_latents, text_dtype, write_cache_info
    from yoso.data.teacher import load_teacher_latents

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    noise_dtype = text_dtype(accelerator.autocast, accelerator.device, weight_dtype)
    if accelerator.is_main_process:
        print(f"precompute_teacher_latents.py: {plan.reason}")
    latent_source = load_teacher_latents(args.pretrained_teacher_model, args.pretrained_model_name_or_path, weight_dtype,
                                         accelerator.device, args.teacher_num_inference_steps, args.teacher_guidance_scale,
                                         plan.transcode, args.teacher_vae, args.revision, args.variant, args.cache_dir)

    per_epoch = num_shards(len(prompts), args.shard_size)
    mine = len(range(accelerator.process_index, per_epoch * args.num_train_epochs, accelerator.num_processes))
    bar = tqdm(total=mine * args.shard_size, unit="prompt", disable=not accelerator.is_local_main_process,
               desc=f"teacher latents ({per_epoch * args.num_train_epochs} shards, {accelerator.num_processes} processes)")
    try:
        precompute_latents(args.output_dir, latent_source, prompts, settings, args.num_train_epochs, args.shard_size,
                           args.train_batch_size, accelerator.process_index, accelerator.num_processes, accelerator.device,
                           noise_dtype, accelerator.autocast, progress=bar.update)
    except LatentCacheError as error:
        refuse(error)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors import safe_open

        from yoso.data.latent_cache import shard_file_name

        with safe_open(f"{args.output_dir}/{shard_file_name(0, 0)}", framework="pt") as f:
            latent_dtype = f.get_slice("latents")[0:1].dtype
        info = write_cache_info(args.output_dir, settings, args.num_train_epochs, args.shard_size, args.train_batch_size,
                                latent_dtype, noise_dtype, accelerator.mixed_precision)
        print(f"teacher-latent cache: {args.output_dir} ({info['num_prompts']} prompts x {info['num_epochs']} epochs, "
              f"{info['dtype']} latents {tuple(info['latent_shape'])})")
    accelerator.wait_for_everyone()
    del latent_source
    accelerator.end_training()


def main_images(args):
    """The base VAE's latents of map-style image data (yoso/data/latent_cache.py, "Image caches")."""
    from yoso.utils.model_configs import ArgumentError
    from yoso.data.image_data import ImageDataError, check_image_data
    from yoso.data.latent_cache import LatentCacheError, image_latent_shape, make_image_cache_settings, \
        refuse_streamed_image_data

    try:
        check_sizes(args)
        refuse_streamed_image_data(args)
        check_image_data(args)  # flags and columns, from the dataset's features or first record
        settings = make_image_cache_settings(args, image_latent_shape(args))
        check_existing_cache(args, settings)
    except (ArgumentError, ImageDataError, LatentCacheError) as error:
        refuse(error)

    from argparse import Namespace

    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from yoso.data.image_data import open_image_source
    from yoso.data.latent_cache import num_shards, precompute_image_latents, write_cache_info

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    def open_source(batch_size):
        # Every process sees all of the data, as one process of batch_size would: the cache's rows are positions.
        return open_image_source(Namespace(**{**vars(args), "train_batch_size": batch_size}), rank=0, world_size=1)

    try:
        with accelerator.main_process_first():  # datasets prepares its cache once
            sources = {args.train_batch_size: open_source(args.train_batch_size)}
        settings["num_samples"] = sources[args.train_batch_size].num_samples
        check_existing_cache(args, settings)
    except (ArgumentError, ImageDataError) as error:
        refuse(error)
    # Training runs the frozen VAE in the weight dtype, outside autocast: the same here.
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision,
                                        variant=args.variant, cache_dir=args.cache_dir)
    vae.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)

    count = settings["num_samples"]
    per_epoch = num_shards(count, args.shard_size)
    work = [(e, s) for e in range(args.num_train_epochs) for s in range(per_epoch)][accelerator.process_index::accelerator.num_processes]
    bar = tqdm(total=sum(min(args.shard_size, count - s * args.shard_size) for _, s in work), unit="image",
               disable=not accelerator.is_local_main_process,
               desc=f"image latents ({per_epoch * args.num_train_epochs} shards, {accelerator.num_processes} processes)")
    def source_of(batch_size):
        if batch_size not in sources:
            sources[batch_size] = open_source(batch_size)
        return sources[batch_size]

    try:
        precompute_image_latents(args.output_dir, vae, source_of, settings, args.num_train_epochs, args.shard_size, args.train_batch_size,
                                 accelerator.process_index, accelerator.num_processes, progress=bar.update)
    except (LatentCacheError, ImageDataError) as error:
        refuse(error)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors import safe_open

        from yoso.data.latent_cache import shard_file_name

        info = write_cache_info(args.output_dir, settings, args.num_train_epochs, args.shard_size, args.train_batch_size,
                                torch.float32, torch.float32, accelerator.mixed_precision)
        replaced = 0
        for epoch in range(info["num_epochs"]):
            for shard in range(per_epoch):
                with safe_open(f"{args.output_dir}/{shard_file_name(epoch, shard)}", framework="pt") as f:
                    replaced += int((f.get_tensor("indices") != f.get_tensor("sample_ids")).sum())
        print(f"image-latent cache: {args.output_dir} ({count} images x {info['num_epochs']} epochs, {info['dtype']} "
              f"latents {tuple(info['latent_shape'])}; {replaced} slots hold the next readable image in place of an "
              "unreadable one)")
    accelerator.wait_for_everyone()
    del vae
    accelerator.end_training()


if __name__ == "__main__":
    main()
