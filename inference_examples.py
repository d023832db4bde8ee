"""Generate images with a YOSO LoRA: the usage snippets of docs/inference.md as one command.

    python inference_examples.py --lora Luo-Yihong/yoso_sd1.5_lora                      # 2 steps, LCM
    python inference_examples.py --lora yoso-lora-output --mode dpm --prompt "A photo of a girl, XT3"
    python inference_examples.py --lora yoso-lora-output --mode one_step_ipi            # 1 step, informative prior
    python inference_examples.py --lora Luo-Yihong/yoso_sd1.5_lora --mode one_step_ipi --ipi_from_samples 32

Writes one PNG per image (its settings in the PNG's "parameters" text chunk) and ``grid.png`` (a row per
prompt) into --output_dir and prints their paths. Each prompt gets its own generator seeded with --seed,
so a prompt's images do not depend on the other prompts. --output_dir is created only once the pipeline and the
LoRA have loaded, so an error leaves no empty folder behind. Bad input stops with a one-line ``inference_examples.py: error: ...``
and exit status 2. The logic lives in yoso/evaluation/inference.py.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from yoso.training.cli import BAD_INPUT, HelpFormatter, OneLineErrorParser

PROG = "inference_examples.py"
DEFAULT_BASE_MODEL = "stablediffusionapi/realistic-vision-v51"
DEFAULT_LORA = "Luo-Yihong/yoso_sd1.5_lora"
DEFAULT_PROMPT = "A photo of a man, XT3"


def build_parser():
    p = OneLineErrorParser(prog=PROG, formatter_class=HelpFormatter, description="YOSO-LoRA inference: 2-step LCM or DPM-Solver, 1-step with the informative prior (IPI), or plain 1-step.")
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_BASE_MODEL,
                   help="SD1.5-family diffusers folder or hub id: the base the LoRA was trained on (default: %(default)s)")
    p.add_argument("--base_model", dest="pretrained_model_name_or_path", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the former name, still accepted
    p.add_argument("--lora", default=DEFAULT_LORA, help="folder with pytorch_lora_weights.safetensors, a .safetensors file, or a hub id (default: %(default)s)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", nargs="+", metavar="TEXT", help=f"one or more prompts (default: {DEFAULT_PROMPT!r})")
    prompts.add_argument("--prompt_file", help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--mode", choices=("lcm", "dpm", "one_step_ipi", "one_step"), default="lcm",
                   help="sampler: 2-step LCM or DPM-Solver, 1-step with the informative prior (IPI), or plain 1-step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: 2 for lcm/dpm; the one-step modes take 1)")
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance scale (default: 1.5, and 1.0 for one_step)")
    p.add_argument("--seed", type=int, default=318, help="seeds each prompt's generator (default: %(default)s)")
    p.add_argument("--num_images_per_prompt", type=int, default=1, help="images generated for each prompt (default: %(default)s)")
    p.add_argument("--lora_scale", type=float, default=1.0, help="LoRA strength (default: %(default)s)")
    p.add_argument("--fuse_lora", action="store_true", help="merge the LoRA into the UNet weights (same images, faster)")
    stats = p.add_mutually_exclusive_group()
    stats.add_argument("--latent_stats", default=None, help="one_step_ipi: latent statistics file (default: latent_stats.safetensors beside the LoRA)")
    stats.add_argument("--ipi_from_samples", type=int, default=None, metavar="N",
                       help="one_step_ipi: compute the statistics from N two-step samples of this pipeline (saved to --output_dir)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"), help="auto: float16 on CUDA, else float32")
    p.add_argument("--output_dir", default="outputs/yoso_samples", help="where the images and the grid are written (default: %(default)s)")
    return p


def read_prompts(args, parser):
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            parser.error(f"--prompt_file {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"--prompt_file {path} could not be read as UTF-8 text: {exc}")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            parser.error(f"--prompt_file {path} has no prompts")
        return prompts
    return args.prompt or [DEFAULT_PROMPT]


def check_args(args, parser):
    from yoso.evaluation.inference import DEFAULT_GUIDANCE, DEFAULT_STEPS, ONE_STEP_MODES

    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.mode]
    if args.mode in ONE_STEP_MODES and args.steps != 1:
        parser.error(f"--mode {args.mode} takes one step, not --steps {args.steps}")
    if args.guidance_scale is None:
        args.guidance_scale = DEFAULT_GUIDANCE[args.mode]
    if args.mode != "one_step_ipi" and (args.latent_stats or args.ipi_from_samples):
        parser.error("--latent_stats and --ipi_from_samples are for --mode one_step_ipi")


def slug(text, limit=40):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def run(args, prompts):
    import torch
    from diffusers.utils import make_image_grid
    from PIL.PngImagePlugin import PngInfo

    from yoso.evaluation import inference as yi
    from yoso.data.latent_stats import LATENT_STATS_NAME, load_latent_stats, save_latent_stats
    from yoso.outputs.output_dir import check_creatable, make_output_dir

    # Everything that can be checked without a model first: these fail fast, in one line.
    source = yi.resolve_lora(args.lora)
    yi.check_base_model(args.pretrained_model_name_or_path)
    stats_path = None
    if args.mode == "one_step_ipi" and args.ipi_from_samples is None:
        stats_path = yi.find_latent_stats(source, args.latent_stats)
        if stats_path is None:
            raise yi.InferenceError(yi.missing_stats_message(args.lora))
    latent_stats = load_latent_stats(stats_path) if stats_path else None
    if args.ipi_from_samples and source.local_dir and Path(args.output_dir).resolve() == source.local_dir.resolve():
        raise yi.InferenceError("--ipi_from_samples saves latent_stats.safetensors to --output_dir, which is the LoRA's folder: "
                                "choose another --output_dir so the training's statistics are not overwritten")
    device, dtype = yi.resolve_device_dtype(args.device, args.dtype)
    output_dir = check_creatable(args.output_dir)

    pipe = yi.load_pipeline(args.pretrained_model_name_or_path, device, dtype)
    yi.set_scheduler(pipe, args.mode)
    yi.load_lora(pipe, source, base_model=args.pretrained_model_name_or_path, lora_scale=args.lora_scale, fuse=args.fuse_lora)
    # Only now is there something to write: an error above leaves no empty folder behind.
    make_output_dir(output_dir)

    if args.mode == "one_step_ipi" and latent_stats is None:
        generator = torch.Generator().manual_seed(args.seed + 1)
        mean, std = yi.latent_stats_from_samples(pipe, prompts, args.ipi_from_samples, generator, args.guidance_scale)
        stats_path = save_latent_stats(output_dir / LATENT_STATS_NAME, mean, std, args.ipi_from_samples)
        print(f"latent statistics from {args.ipi_from_samples} two-step samples: {stats_path}", file=sys.stderr)
        latent_stats = (mean, std)

    settings = {"base_model": args.pretrained_model_name_or_path, "lora": args.lora, "lora_scale": args.lora_scale, "fuse_lora": args.fuse_lora,
                "mode": args.mode, "steps": args.steps, "guidance_scale": args.guidance_scale, "seed": args.seed,
                "dtype": str(dtype).replace("torch.", ""), "latent_stats": str(stats_path) if stats_path else None}
    paths, images = [], []
    for p, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(args.seed)
        batch = yi.generate(pipe, prompt, args.mode, steps=args.steps, guidance_scale=args.guidance_scale, generator=generator,
                            num_images_per_prompt=args.num_images_per_prompt, latent_stats=latent_stats)
        for k, image in enumerate(batch):
            info = PngInfo()
            info.add_text("parameters", json.dumps({**settings, "prompt": prompt, "image_index": k}))
            path = output_dir / f"{p:03d}_{k:02d}_{slug(prompt)}.png"
            image.save(path, pnginfo=info)
            paths.append(path)
            images.append(image)
            print(path)
    grid = output_dir / "grid.png"
    make_image_grid(images, rows=len(prompts), cols=args.num_images_per_prompt).save(grid)
    print(grid)
    return paths + [grid]


def main(argv=None):
    """Run the command line; returns the written paths (images, then the grid). Bad input: exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    prompts = read_prompts(args, parser)

    from yoso.evaluation.inference import InferenceError
    from yoso.data.latent_stats import LatentStatsError
    from yoso.utils.library_noise import quiet_library_notices
    from yoso.outputs.output_dir import OutputDirError

    quiet_library_notices()
    try:
        return run(args, prompts)
    except (InferenceError, LatentStatsError, OutputDirError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(BAD_INPUT) from None


if __name__ == "__main__":
    main()
