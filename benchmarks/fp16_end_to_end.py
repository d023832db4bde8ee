"""train_yoso_lora.py end to end in fp16 on one GPU, with the tiny models: the fp16 check of the GPU call (benchmarks/gpu_run.sh).

    python benchmarks/fp16_end_to_end.py --output_dir OUT               # on a CUDA machine
    python benchmarks/fp16_end_to_end.py --output_dir OUT --emulate_on_cpu   # the same on CPU (a dry run)

Builds the tiny SD1.5-/SD-Turbo-shaped models offline, then:
  1. trains 6 steps under ``accelerate launch --mixed_precision fp16`` (batch 4, accumulation 2, EMA,
     checkpoints every 2 steps, validation at step 6, tensorboard);
  2. resumes a second run from checkpoint-4 to step 6 and compares it with the first;
  3. loads the LoRA into a fresh fp16 pipeline with ``load_lora_weights`` and samples 1 and 2 LCM steps.
Writes ``OUT/fp16_e2e_<card>.json`` (every measured value and each check's verdict) and the validation grid;
exits 1 if a check fails. Models and runs live in a temporary folder. ``--emulate_on_cpu`` runs the script
through tests/fp16_on_cpu.py (torch's CPU GradScaler and fp16 autocast), so CI can run this file.
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS, RESUME_FROM = 6, 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Where the JSON report and the validation grid go.")
    parser.add_argument("--emulate_on_cpu", action="store_true",
                        help="Run on CPU with GPU fp16 emulated (tests/fp16_on_cpu.py); for CI.")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--resume_tolerance", type=float, default=1e-3,
                        help="Largest allowed |uninterrupted - resumed| weight difference (GPU kernels need not be "
                             "bitwise deterministic; on CPU the runs are equal).")
    parser.add_argument("--timeout", type=int, default=240, help="Seconds per training run.")
    return parser.parse_args(argv)


def launch(script_args, emulate, timeout):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "fp16", "--dynamo_backend", "no"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if emulate:
        command += [str(REPO / "tests" / "fp16_on_cpu.py")]
        env.update(ACCELERATE_USE_CPU="true", FP16_ON_CPU_SCALER=json.dumps({"init_scale": 2.0**10}))
    else:
        command += [str(REPO / "train_yoso_lora.py")]
    start = time.perf_counter()
    result = subprocess.run(command + [str(a) for a in script_args], capture_output=True, text=True, timeout=timeout,
                            env=env, cwd=REPO)
    return result, time.perf_counter() - start


def train_args(base, teacher, prompts, output_dir, resolution, **extra):
    args = ["--pretrained_model_name_or_path", base, "--pretrained_teacher_model", teacher, "--train_data", prompts,
            "--output_dir", output_dir, "--resolution", resolution, "--mixed_precision", "fp16", "--seed", 0,
            "--train_batch_size", 4, "--gradient_accumulation_steps", 2, "--max_train_steps", STEPS,
            "--lora_rank", 4, "--learning_rate", 1e-3, "--use_ema", "--ema_decay", 0.5, "--checkpointing_steps", 2]
    for key, value in extra.items():
        args += [f"--{key}"] + (value if isinstance(value, list) else [value])
    return args


def max_difference(file_a, file_b):
    from safetensors.torch import load_file

    a, b = load_file(file_a), load_file(file_b)
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def scaler_scales(checkpoint):
    """(G's scale, D's scale): accelerate's scaler.pt, and D's scaler, the last registered custom object."""
    import torch

    customs = sorted(checkpoint.glob("custom_checkpoint_*.pkl"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    g = torch.load(checkpoint / "scaler.pt", weights_only=False)
    d = torch.load(customs[-1], weights_only=False)
    return g.get("scale"), d.get("scale") if isinstance(d, dict) else None


def tracker_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def sample_with_lora(base, lora_dir, device, resolution):
    """1- and 2-step LCM images from a fresh fp16 pipeline with the LoRA, and from the base (same noise)."""
    import numpy as np
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, dtype=dtype).to(device)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)

    def sample(steps):
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(["a red fox in the snow", "a bowl of ramen"], num_inference_steps=steps, guidance_scale=1.0,
                    height=resolution, width=resolution, generator=generator, output_type="np").images

    base_images = sample(1)
    pipe.load_lora_weights(lora_dir)
    lora_dtypes = sorted({str(p.dtype) for n, p in pipe.unet.named_parameters() if "lora_" in n})
    one, two = sample(1), sample(2)
    return {
        "pipeline_dtype": str(dtype),
        "lora_parameter_dtypes_in_pipeline": lora_dtypes,
        "finite": bool(np.isfinite(one).all() and np.isfinite(two).all()),
        "mean_abs_change_vs_base_1_step": float(np.abs(one - base_images).mean()),
        "mean_abs_1_vs_2_steps": float(np.abs(one - two).mean()),
    }


def main(argv=None):
    args = parse_args(argv)
    import torch

    from yoso.testing import build_tiny_models, sample_journeydb_records

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.emulate_on_cpu
    if not cuda and not args.emulate_on_cpu:
        sys.exit("fp16_end_to_end.py: error: no CUDA device; use --emulate_on_cpu for a dry run on CPU")
    card = torch.cuda.get_device_name(0) if cuda else "cpu-emulated-fp16"
    tag = "".join(ch for ch in card.lower().replace(" ", "_") if ch.isalnum() or ch == "_")
    report = {"card": card, "torch": torch.__version__, "python": platform.python_version(), "steps": STEPS,
              "resolution": args.resolution, "checks": {}}
    for name in ("diffusers", "transformers", "accelerate", "peft"):
        report[name] = __import__(name).__version__
    checks = report["checks"]

    with tempfile.TemporaryDirectory(prefix="yoso-fp16-") as tmp:
        tmp = Path(tmp)
        base, teacher = (str(p) for p in build_tiny_models(tmp / "models", resolution=args.resolution))
        prompts = tmp / "prompts.jsonl"
        records = sample_journeydb_records(48)
        prompts.write_text("".join(json.dumps({"prompt": r["Task2"]["Caption"]}) + "\n" for r in records))
        res = str(args.resolution)

        out_a = tmp / "run_a"
        # A non-finite loss already ends the run with exit code 1; tensorboard (if present) adds the values.
        has_tensorboard = importlib.util.find_spec("tensorboard") is not None
        result, seconds = launch(train_args(base, teacher, prompts, out_a, res, validation_prompts=["a red fox"],
                                            validation_steps=str(STEPS),
                                            report_to="tensorboard" if has_tensorboard else "none"),
                                 args.emulate_on_cpu, args.timeout)
        report["run"] = {"returncode": result.returncode, "seconds": round(seconds, 1)}
        checks["run exits 0"] = result.returncode == 0
        if result.returncode != 0:
            report["run"]["stderr_tail"] = result.stderr[-4000:]
        else:
            if has_tensorboard:
                scalars = tracker_scalars(out_a / "logs" / "yoso-lora")
                report["losses"] = {k: scalars.get(k) for k in ("loss_con", "loss_kl", "loss_adv", "loss_d", "grad_norm")}
                losses = [v for k in ("loss_con", "loss_kl", "loss_adv", "loss_d") for v in (scalars.get(k) or [])]
                checks["losses logged for every step and finite"] = (
                    len(losses) == 4 * STEPS and all(abs(v) < float("inf") for v in losses))
            else:
                report["losses"] = "not recorded: tensorboard is not installed (exit code 0 means all were finite)"
            report["scaler_scales_g_d"] = {f"checkpoint-{s}": scaler_scales(out_a / f"checkpoint-{s}")
                                           for s in range(2, STEPS + 1, 2)}
            checks["both scalers checkpointed"] = all(g and d for g, d in report["scaler_scales_g_d"].values())
            from safetensors.torch import load_file

            lora = load_file(out_a / "pytorch_lora_weights.safetensors")
            checks["saved LoRA is fp32 and finite"] = all(t.dtype == torch.float32 and torch.isfinite(t).all().item()
                                                          for t in lora.values())
            grid = out_a / "validation" / f"step-{STEPS:06d}.png"
            checks["validation grid written"] = grid.is_file()
            if grid.is_file():
                shutil.copy(grid, output_dir / f"fp16_e2e_{tag}_validation.png")

            out_b = tmp / "run_b"
            out_b.mkdir()
            shutil.copytree(out_a / f"checkpoint-{RESUME_FROM}", out_b / f"checkpoint-{RESUME_FROM}")
            result, seconds = launch(train_args(base, teacher, prompts, out_b, res, resume_from_checkpoint="latest"),
                                     args.emulate_on_cpu, args.timeout)
            report["resume"] = {"returncode": result.returncode, "seconds": round(seconds, 1)}
            if result.returncode == 0:
                report["resume"]["max_abs_difference"] = {
                    name: max_difference(out_a / name, out_b / name)
                    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors",
                                 f"checkpoint-{STEPS}/discriminator.safetensors")}
                report["resume"]["scaler_scales_g_d"] = scaler_scales(out_b / f"checkpoint-{STEPS}")
            else:
                report["resume"]["stderr_tail"] = result.stderr[-4000:]
            checks[f"resume from checkpoint-{RESUME_FROM} matches (<= {args.resume_tolerance})"] = (
                result.returncode == 0
                and max(report["resume"]["max_abs_difference"].values()) <= args.resume_tolerance
                and report["resume"]["scaler_scales_g_d"] == report["scaler_scales_g_d"][f"checkpoint-{STEPS}"])

            report["inference"] = sample_with_lora(base, str(out_a), "cuda" if cuda else "cpu", args.resolution)
            checks["fp16 pipeline + load_lora_weights samples finite images that differ from the base"] = (
                report["inference"]["finite"] and report["inference"]["mean_abs_change_vs_base_1_step"] > 0)

    report["passed"] = all(checks.values())
    path = output_dir / f"fp16_e2e_{tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"report: {path}")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
