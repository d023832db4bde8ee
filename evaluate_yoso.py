"""FID and CLIP score of YOSO LoRAs on a prompt set, for every sampling mode of inference_examples.py.

    python evaluate_yoso.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --lora yoso-lora-output \\
        --prompts annotations/captions_val2014.json --num_prompts 5000 --reference_dir val2014 \\
        --reference_images matched --modes lcm:1,2,4 one_step_ipi --output_dir eval-coco5k
    accelerate launch --num_processes 8 evaluate_yoso.py ...      # the prompts shared out over 8 GPUs

``--modes`` takes ``MODE`` or ``MODE:STEPS[,STEPS...]`` tokens (modes: lcm, dpm, one_step_ipi, one_step);
a bare lcm/dpm takes the step counts of ``--steps`` (default 2), the one-step modes take 1 step.

Every image is saved as soon as it is made; running the same command again makes only the missing ones
(image k is seeded ``--seed + k``, so it does not depend on what was skipped). Under ``accelerate launch``
each process makes its share, and the main process computes the metrics once all images exist and writes
``metrics.json``, ``metrics.md`` (a table) and ``grid.png``. The protocol (image sizes, resizing, feature
networks) is written into both reports: see yoso/evaluation/metrics.py. Bad input stops with one line,
``evaluate_yoso.py: error: ...``, and exit status 2, before any model is loaded where it can be.
"""

import argparse
import sys
import warnings
from pathlib import Path

from yoso.training.cli import BAD_INPUT, HelpFormatter, OneLineErrorParser

PROG = "evaluate_yoso.py"
DEFAULT_BASE_MODEL = "runwayml/stable-diffusion-v1-5"


def build_parser():
    from yoso.evaluation.metrics import DEFAULT_CLIP_MODEL, FID_PROTOCOLS, FID_RESOLUTION

    p = OneLineErrorParser(prog=PROG, formatter_class=HelpFormatter, description="FID and CLIP score of YOSO LoRAs for each sampling mode and step count.")
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_BASE_MODEL,
                   help="SD1.5-family diffusers folder or hub id: the base the LoRA was trained on (default: %(default)s)")
    p.add_argument("--base_model", dest="pretrained_model_name_or_path", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the former name, still accepted
    p.add_argument("--lora", nargs="+", required=True, metavar="LORA",
                   help="one or more LoRAs: a training --output_dir or other folder with pytorch_lora_weights.safetensors, a .safetensors file, or a hub id")
    p.add_argument("--latent_stats", nargs="+", default=None, metavar="PATH",
                   help="one_step_ipi: latent statistics, one file per --lora (default: latent_stats.safetensors beside each LoRA)")
    p.add_argument("--lora_scale", type=float, default=1.0, help="LoRA strength (default: %(default)s)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="COCO captions annotations (.json, e.g. captions_val2014.json), or prompts: .txt (one a line) or .jsonl ('prompt' key)")
    p.add_argument("--num_prompts", type=int, default=None, metavar="N",
                   help="draw N prompts (COCO: N images, one caption each) with --prompt_seed (default: all)")
    p.add_argument("--prompt_seed", type=int, default=0, help="seeds the draw of the prompts (default: %(default)s)")
    p.add_argument("--reference_dir", required=True, metavar="DIR", help="folder of real images for FID (e.g. COCO val2014)")
    p.add_argument("--reference_images", choices=("all", "matched"), default="all",
                   help="all: every image in --reference_dir; matched: the images of the drawn COCO captions (default: %(default)s)")
    p.add_argument("--modes", nargs="+", default=["lcm"], metavar="MODE[:STEPS]",
                   help="sampling modes with step counts, e.g. lcm:1,2,4 dpm:2 one_step_ipi one_step (default: lcm)")
    p.add_argument("--steps", type=int, nargs="+", default=None, metavar="N",
                   help="step counts for lcm/dpm named without :STEPS in --modes (default: 2)")
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance scale (default: 1.5, and 1.0 for one_step, as inference_examples.py)")
    p.add_argument("--seed", type=int, default=0, help="image k of every run is drawn from a generator seeded SEED + k (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="images per pipeline call (default: %(default)s)")
    p.add_argument("--fid_feature_net", default="auto", metavar="PATH",
                   help="TorchScript FID feature network called as net(uint8 images, return_features=True); auto: Inception-v3 "
                        "(inception-2015-12-05.pt from NVlabs, downloaded to torch's hub cache once)")
    p.add_argument("--fid_protocol", choices=FID_PROTOCOLS, default="crop_uint8",
                   help="FID preprocessing: crop_uint8 (center crop, PIL bicubic on the 8-bit image) or clean "
                        "(clean-fid's: no crop, float resize per channel) (default: %(default)s)")
    p.add_argument("--fid_resolution", type=int, default=FID_RESOLUTION, help="FID input size (default: %(default)s)")
    p.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP model folder or hub id for the CLIP score (default: %(default)s)")
    p.add_argument("--metrics_batch_size", type=int, default=50, help="images per feature-network call (default: %(default)s)")
    p.add_argument("--grid_prompts", type=int, default=8, help="columns of grid.png: the first N prompts (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (each process's accelerator, else CPU), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"), help="auto: float16 on CUDA, else float32")
    p.add_argument("--output_dir", default="outputs/yoso_eval", help="images, reports and the grid; a rerun resumes here (default: %(default)s)")
    return p


def check_args(args, parser):
    if args.latent_stats is not None and len(args.latent_stats) != len(args.lora):
        parser.error(f"--latent_stats takes one file per --lora: {len(args.lora)} LoRAs, {len(args.latent_stats)} files")


def plan_evaluation(args, device_spec):
    """Every check that needs no model, and the :class:`yoso.evaluation.runs.Plan`; raises one-line errors."""
    from yoso.evaluation import runs as ev
    from yoso.evaluation import inference as yi
    from yoso.evaluation.metrics import list_images, sha256_file
    from yoso.data.latent_stats import LATENT_STATS_NAME, load_latent_stats
    from yoso.outputs.output_dir import check_creatable

    mode_steps = ev.parse_modes(args.modes, args.steps)
    prompts = ev.read_prompts(args.prompts, args.num_prompts, args.prompt_seed)
    if len(prompts) < 2:
        raise ev.EvaluationError(f"--prompts {args.prompts} has {len(prompts)} prompt; FID needs at least 2")
    yi.check_base_model(args.pretrained_model_name_or_path)
    loras = [yi.resolve_lora(spec) for spec in args.lora]
    lora_sha = [sha256_file(Path(s.location) / s.weight_name) if s.local_dir else None for s in loras]

    uses_ipi = any(mode == "one_step_ipi" for mode, _ in mode_steps)
    if args.latent_stats and not uses_ipi:
        raise ev.EvaluationError("--latent_stats is for --modes one_step_ipi, which is not among --modes")
    latent_stats = [None] * len(loras)
    if uses_ipi:
        for i, source in enumerate(loras):
            path = yi.find_latent_stats(source, args.latent_stats[i] if args.latent_stats else None)
            if path is None:
                raise ev.EvaluationError(
                    f"--modes one_step_ipi needs latent statistics, and --lora {source.spec} has no {LATENT_STATS_NAME} beside it: "
                    f"point --lora at the training's --output_dir, pass one --latent_stats file per --lora, or make one with "
                    f"inference_examples.py --mode one_step_ipi --ipi_from_samples 32 --output_dir DIR (DIR/{LATENT_STATS_NAME})")
            load_latent_stats(path)  # a broken file fails here, not after the pipeline loaded
            latent_stats[i] = (str(path), sha256_file(path))

    reference_dir = Path(args.reference_dir)
    if not reference_dir.is_dir():
        raise ev.EvaluationError(f"--reference_dir {reference_dir}: no such folder")
    if args.reference_images == "matched":
        if any(p["image_file"] is None for p in prompts):
            raise ev.EvaluationError("--reference_images matched needs COCO captions annotations (.json) as --prompts, which name each caption's image")
        reference = [reference_dir / p["image_file"] for p in prompts]
        missing = [p for p in reference if not p.is_file()]
        if missing:
            raise ev.EvaluationError(f"--reference_images matched: {len(missing)} of the {len(reference)} images are not in "
                                     f"--reference_dir {reference_dir}, e.g. {missing[0].name}")
    else:
        reference = list_images(reference_dir)
        if len(reference) < 2:
            raise ev.EvaluationError(f"--reference_dir {reference_dir} has {len(reference)} images (.png, .jpg, .jpeg, .webp, .bmp); FID needs at least 2")

    output_dir = check_creatable(args.output_dir)
    device, dtype = yi.resolve_device_dtype(device_spec, args.dtype)
    plan = ev.Plan(output_dir=output_dir, base_model=args.pretrained_model_name_or_path, loras=loras, lora_sha256=lora_sha,
                   latent_stats=latent_stats, prompts=prompts, runs=ev.make_runs(args.lora, mode_steps, args.guidance_scale),
                   seed=args.seed, lora_scale=args.lora_scale, dtype=str(dtype).replace("torch.", ""),
                   extra={"prompts": {"source": str(args.prompts), "prompt_seed": args.prompt_seed,
                                      "kind": "coco" if prompts[0]["image_file"] else Path(args.prompts).suffix.lstrip(".")},
                          "reference": {"dir": str(reference_dir), "images": args.reference_images}})
    ev.check_resume(plan)
    return plan, reference, device, dtype


def load_models(plan, pending, device, dtype):
    """The pipeline with every LoRA this process needs as its own adapter (``lora{i}``); the latent statistics."""
    from yoso.evaluation import runs as ev
    from yoso.evaluation import inference as yi
    from yoso.data.latent_stats import load_latent_stats

    pipe = yi.load_pipeline(plan.base_model, device, dtype)
    pipe.set_progress_bar_config(disable=True)  # one bar for the whole evaluation instead of one per call
    stats = [None] * len(plan.loras)
    for i in sorted({run.lora_index for run in pending}):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # several LoRAs side by side, on purpose
            yi.load_lora(pipe, plan.loras[i], base_model=plan.base_model, adapter_name=ev.adapter_name(i))
        if plan.latent_stats[i] and any(r.lora_index == i and r.mode == "one_step_ipi" for r in pending):
            stats[i] = load_latent_stats(plan.latent_stats[i][0])
            if stats[i][0].shape[0] != pipe.unet.config.in_channels:
                raise yi.InferenceError(f"latent statistics {plan.latent_stats[i][0]} have {stats[i][0].shape[0]} channels, "
                                        f"the UNet of --pretrained_model_name_or_path {plan.base_model} takes {pipe.unet.config.in_channels}")
    return pipe, stats


def evaluate(args, state, stage=None):
    """The whole evaluation on this process; returns the report on the main process, None elsewhere.
    ``stage["planned"]`` becomes True once the input checks (the same on every process) have passed."""
    import gc

    import torch
    from tqdm.auto import tqdm

    from yoso.evaluation import runs as ev
    from yoso.evaluation.metrics import CLIPScorer, FIDScorer, resolve_clip_model, resolve_fid_feature_net
    from yoso.outputs.output_dir import make_output_dir

    device_spec = str(state.device) if args.device == "auto" and state.num_processes > 1 else args.device
    plan, reference, device, dtype = plan_evaluation(args, device_spec)
    if stage is not None:
        stage["planned"] = True
    fid_scorer = clip_scorer = None
    if state.is_main_process:
        # Loaded now so that a missing or broken metric model is reported before hours of generation.
        fid_scorer = FIDScorer(resolve_fid_feature_net(args.fid_feature_net), device, args.fid_resolution, args.metrics_batch_size,
                               args.fid_protocol)
        clip_scorer = CLIPScorer(resolve_clip_model(args.clip_model), device, args.metrics_batch_size, name=args.clip_model)

    pending = plan.pending(state.process_index, state.num_processes)
    pipe, stats = load_models(plan, pending, device, dtype) if pending else (None, None)
    state.wait_for_everyone()  # every process has its models: only now is there something to write
    if state.is_main_process:
        make_output_dir(plan.output_dir)
        ev.write_manifests(plan)
    state.wait_for_everyone()
    if pending:
        total = sum(len(v) for v in pending.values())
        with tqdm(total=total, desc="generating", unit="img", disable=not state.is_local_main_process) as progress:
            ev.generate_pending(pipe, plan, pending, args.batch_size, stats, progress, rank=state.process_index)
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    results = ev.compute_metrics(plan, reference, fid_scorer, clip_scorer,
                                 progress_factory=lambda total, desc: tqdm(total=total, desc=desc, unit="img"))
    from PIL import Image

    with Image.open(plan.runs[0].image_path(plan.output_dir, 0)) as first:
        image_size = first.size
    report = ev.build_report(plan, results, fid_scorer.protocol(), clip_scorer.protocol(), image_size, state.num_processes)
    paths = ev.write_reports(plan, report, args.grid_prompts)
    print(ev.markdown_table(report))
    for path in paths:
        print(path)
    return report


def main(argv=None):
    """Run the command line. Returns the report (a dict) on the main process. Bad input: exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from yoso.evaluation.runs import EvaluationError
    from yoso.evaluation.metrics import MetricsError
    from yoso.evaluation.inference import InferenceError
    from yoso.data.latent_stats import LatentStatsError
    from yoso.outputs.output_dir import OutputDirError

    # As accelerate's own AcceleratorState does: `accelerate launch --cpu` / ACCELERATE_USE_CPU means gloo on CPUs.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or args.device == "cpu")
    stage = {"planned": False}
    try:
        return evaluate(args, state, stage)
    except (EvaluationError, InferenceError, LatentStatsError, MetricsError, OutputDirError) as exc:
        # Every process meets the same bad input: the main process says it once. Past the checks an error
        # can be one process's own (a LoRA that only it loads): that process says it. Either way the
        # launcher stops the other processes when one exits.
        if state.is_main_process or stage["planned"]:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(BAD_INPUT) from None


if __name__ == "__main__":
    main()
