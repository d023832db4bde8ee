#!/usr/bin/env python
"""One command for the whole digits experiment: base model, teacher, YOSO-LoRA trainings,
evaluation, table and figure.

    python experiments/digits/run.py            # full budgets; writes figures/digits_results.{md,json}, figures/digits_samples.png
    python experiments/digits/run.py --quick    # tiny budgets (CI); writes its table and figure under its --out

Stages, in order; each is skipped when its outputs exist and were made with the same settings:

1. classifier    digit classifier on the real training split           OUT/classifier.{npz,json}
2. base          text encoder, autoencoder, UNet; base + teacher       OUT/base, OUT/teacher, OUT/base_model.json
3. yoso          prompts file and the training images as an imagefolder, then `accelerate launch
                 train_yoso_lora.py` for YOSO-LoRA, YOSO-LoRA on real images, a variant, 5 ablations
                                                                        OUT/yoso/<run>/
4. evaluate      N images per digit for every row, metrics             OUT/eval/<row>.{json,npz}
5. report        markdown + JSON table, sample figure                  FIGURES/<prefix>_results.{md,json}, <prefix>_samples.png
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from experiments.digits import data as D  # noqa: E402

TRAIN_SCRIPT = REPO / "train_yoso_lora.py"

FULL = {
    "classifier_max_iter": 500,
    "text_steps": 100, "text_lr": 1e-3,
    "vae_steps": 500, "vae_batch": 32, "vae_lr": 2e-3, "vae_kl_weight": 1e-3,
    "unet_channels": [32, 64], "unet_steps": 1700, "unet_batch": 128, "unet_lr": 1e-3, "caption_dropout": 0.1,
    "unet_ema_decay": 0.998,
    # The recipe chosen by the trials in experiments/digits/README.md ("Recipe trials"): cosine decay of the
    # learning rate to 0 over 240 steps, no warmup, EMA decay 0.995. The released recipe at this scale (constant
    # learning rate, 480 steps, EMA 0.99), the table's until then, is RELEASED_RECIPE.
    "yoso_steps": 240, "yoso_batch": 16, "yoso_lr": 5e-4, "yoso_rank": 16, "yoso_alpha": 16, "yoso_ema_decay": 0.995,
    "yoso_lr_scheduler": "cosine", "yoso_lr_warmup_steps": 0,
    "yoso_runs": ["main", "real_data", "mse_consistency", "kl_sample", "old_defaults", "sample_reduction", "no_adversarial",
                  "no_consistency"],
    "n_per_digit": 100, "eval_batch": 250, "fd_bootstrap": 25,
}

QUICK = {
    "classifier_max_iter": 200,
    "text_steps": 5, "text_lr": 1e-3,
    "vae_steps": 4, "vae_batch": 8, "vae_lr": 2e-3, "vae_kl_weight": 1e-3,
    "unet_channels": [32, 64], "unet_steps": 4, "unet_batch": 16, "unet_lr": 1e-3, "caption_dropout": 0.1,
    "unet_ema_decay": 0.998,
    "yoso_steps": 2, "yoso_batch": 2, "yoso_lr": 5e-4, "yoso_rank": 4, "yoso_alpha": 4, "yoso_ema_decay": 0.9,
    "yoso_lr_scheduler": "cosine", "yoso_lr_warmup_steps": 0,
    # The pipeline's minimum: the teacher route, the real-image route and one ablation (every run's flags are
    # checked against the training script's parser in the tests without training).
    "yoso_runs": ["main", "real_data", "kl_sample"],
    "n_per_digit": 2, "eval_batch": 250, "fd_bootstrap": 3,
}

BASE_KEYS = ("text_steps", "text_lr", "vae_steps", "vae_batch", "vae_lr", "vae_kl_weight", "unet_channels", "unet_steps", "unet_batch",
             "unet_lr", "caption_dropout", "unet_ema_decay")
YOSO_KEYS = ("yoso_steps", "yoso_batch", "yoso_lr", "yoso_rank", "yoso_alpha", "yoso_ema_decay", "yoso_lr_scheduler",
             "yoso_lr_warmup_steps")
# The table's budget before the recipe trials (480 steps at a constant learning rate, EMA 0.99): what the
# `baseline` trial and the earlier tables ran. `--set` these to train it again.
RELEASED_RECIPE = {"yoso_steps": 480, "yoso_ema_decay": 0.99, "yoso_lr_scheduler": "constant", "yoso_lr_warmup_steps": 500}


class StageError(RuntimeError):
    pass


def log(message):
    print(f"[digits {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _stage_done(marker, settings):
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("settings") == settings
    except (OSError, ValueError):
        return False


def _mark(marker, settings, seconds, **extra):
    marker.write_text(json.dumps({"settings": settings, "seconds": seconds, **extra}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- stages


def stage_classifier(out, budget, quiet):
    from experiments.digits import classifier as C

    settings = {"max_iter": budget["classifier_max_iter"]}
    marker = out / "classifier.done.json"
    if _stage_done(marker, settings) and (out / "classifier.npz").is_file():
        log("classifier: done already")
        return json.loads(marker.read_text())["seconds"]
    t0 = time.time()
    _, info = C.train_and_save(out, max_iter=budget["classifier_max_iter"])
    seconds = time.time() - t0
    _mark(marker, settings, seconds)
    log(f"classifier: test accuracy {100 * info['test_accuracy']:.1f}% ({seconds:.0f} s)")
    return seconds


def stage_base(out, budget, seed, quiet, device):
    from experiments.digits import base_model as B

    settings = {k: budget[k] for k in BASE_KEYS} | {"seed": seed}
    marker = out / "base.done.json"
    if _stage_done(marker, settings) and (out / "base" / "model_index.json").is_file() \
            and (out / "teacher" / "model_index.json").is_file():
        log("base model: done already")
        return json.loads(marker.read_text())["seconds"]
    # A new base invalidates everything trained or measured on the old one.
    for stale in ("yoso", "eval"):
        shutil.rmtree(out / stale, ignore_errors=True)
    t0 = time.time()
    summary = B.train_base_model(out, {k: budget[k] for k in BASE_KEYS}, seed=seed, quiet=quiet, device=device)
    seconds = time.time() - t0
    _mark(marker, settings, seconds)
    log(f"base model: saved {summary['base_dir']} and {summary['teacher_dir']} ({seconds:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()) + ")")
    return seconds


def write_prompts(path):
    """YOSO-LoRA's training prompts: the caption of every training image (templates drawn with a fixed seed),
    one {"prompt": ...} per line."""
    _, train_y, _, _ = D.load_split()
    prompts = D.captions_for(train_y, seed=1)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return len(prompts)


def set_value(text):
    """A ``--set KEY=VALUE`` value: JSON (numbers, lists) or, failing that, the bare word (``constant``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def schedule_words(budget):
    """The learning-rate schedule of the YOSO runs, in words for the table's notes."""
    name, warmup = budget["yoso_lr_scheduler"], budget["yoso_lr_warmup_steps"]
    if name == "constant":
        return "constant"
    return f"{name} schedule" + (f" after {warmup} warmup steps" if warmup else ", no warmup")


def n_prompts_of(out):
    path = Path(out) / "yoso" / "prompts.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def yoso_command(out, run_dir, budget, extra, seed, device):
    """The `accelerate launch train_yoso_lora.py` command of one run. ``extra`` holds the run's own flags; a run
    whose flags name ``--train_data_dir`` trains on that image folder (under ``out``) instead of the teacher."""
    from experiments.digits.evaluate import REAL_DATA_FLAG, TEACHER_GUIDANCE, TEACHER_STEPS

    if REAL_DATA_FLAG in extra:
        at = extra.index(REAL_DATA_FLAG)
        data = [REAL_DATA_FLAG, str(out / extra[at + 1])]
        extra = extra[:at] + extra[at + 2:]
    else:
        data = ["--pretrained_teacher_model", str(out / "teacher"),
                "--train_data", str(out / "yoso" / "prompts.jsonl"),
                "--teacher_num_inference_steps", str(TEACHER_STEPS),
                "--teacher_guidance_scale", str(TEACHER_GUIDANCE)]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        *(["--cpu"] if device == "cpu" else []),
        str(TRAIN_SCRIPT),
        "--pretrained_model_name_or_path", str(out / "base"),
        *data,
        "--resolution", str(D.RESOLUTION),
        "--output_dir", str(run_dir),
        "--train_batch_size", str(budget["yoso_batch"]),
        "--max_train_steps", str(budget["yoso_steps"]),
        "--learning_rate", str(budget["yoso_lr"]),
        "--lr_scheduler", str(budget["yoso_lr_scheduler"]), "--lr_warmup_steps", str(budget["yoso_lr_warmup_steps"]),
        "--lora_rank", str(budget["yoso_rank"]),
        "--lora_alpha", str(budget["yoso_alpha"]),
        "--use_ema", "--ema_decay", str(budget["yoso_ema_decay"]),
        "--lambda_con", "2", "--lambda_kl", "0.5",
        "--seed", str(seed),
        "--mixed_precision", "no",
        "--checkpointing_steps", "100000",
        "--report_to", "none",
        *extra,
    ]


def code_version():
    """The commit, and whether the training code differs from it (read-only git; None outside a checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "train_yoso_lora.py", "yoso"], cwd=REPO,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head or None, "training_code_modified": bool(dirty)}


def prepare_yoso_inputs(out, runs):
    """The prompts file (teacher route) and, for the real-data run, the training images as an imagefolder.
    Returns the number of prompts."""
    from experiments.digits.evaluate import IMAGEFOLDER

    yoso_dir = out / "yoso"
    yoso_dir.mkdir(parents=True, exist_ok=True)
    n_prompts = write_prompts(yoso_dir / "prompts.jsonl")
    if "real_data" in runs:
        n_images = len(D.load_split()[1])
        metadata = out / IMAGEFOLDER / "metadata.jsonl"
        if not (metadata.is_file() and len(metadata.read_text().splitlines()) == n_images):
            D.write_imagefolder(out / IMAGEFOLDER)
            log(f"yoso: wrote {n_images} training images with captions to {out / IMAGEFOLDER}")
    return n_prompts


# A trial's runs keep this many evenly spaced checkpoints and a tensorboard log (the training-health signals).
TRIAL_CHECKPOINTS = 8
HEALTH_PER_DIGIT = 30  # --health: images a digit per checkpoint (300 a row; the table's rows have 1,000)


def trial_training_flags(budget, yoso_flags):
    """A trial's extra train_yoso_lora.py flags: its own (``--yoso_flags``), then checkpoints every
    steps / TRIAL_CHECKPOINTS steps and the tensorboard tracker (neither changes what is trained)."""
    every = max(1, budget["yoso_steps"] // TRIAL_CHECKPOINTS)
    return [*yoso_flags, "--checkpointing_steps", str(every), "--report_to", "tensorboard"]


def train_yoso_run(out, name, run_dir, marker, budget, seed, n_prompts, quiet, device, trial_flags=()):
    """Train YOSO-LoRA run ``name`` (a key of ``YOSO_RUNS``) with ``seed`` into ``run_dir``, unless ``marker``
    says it was made with the same settings. ``trial_flags``: further flags (a recipe trial's), after the run's
    own. Returns its training seconds."""
    from experiments.digits.evaluate import YOSO_RUNS

    label, extra = YOSO_RUNS[name]
    extra = list(extra) + list(trial_flags)
    cmd = yoso_command(out, run_dir, budget, extra, seed, device)
    settings = {k: budget[k] for k in YOSO_KEYS} | {"seed": seed, "extra": extra, "prompts": n_prompts}
    if _stage_done(marker, settings) and (run_dir / "pytorch_lora_weights.safetensors").is_file():
        log(f"yoso {run_dir.name}: done already")
        return json.loads(marker.read_text())["seconds"]
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"yoso {run_dir.name} ({label}, seed {seed}): {budget['yoso_steps']} steps x {budget['yoso_batch']} "
        + ("images" if name == "real_data" else "prompts"))
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    log_path = marker.with_name(marker.name.replace(".done.json", ".log"))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        log_file.write(" ".join(cmd) + "\n\n")
        log_file.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=None if not quiet else log_file,
                              stderr=subprocess.STDOUT if quiet else None)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:] if quiet else ""
        raise StageError(f"train_yoso_lora.py failed for run '{run_dir.name}' (exit {proc.returncode}); command in {log_path}\n{tail}")
    for needed in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors", "latent_stats.safetensors"):
        if not (run_dir / needed).is_file():
            raise StageError(f"train_yoso_lora.py finished run '{run_dir.name}' but wrote no {run_dir / needed}")
    seconds = time.time() - t0
    _mark(marker, settings, seconds, command=cmd, code=code_version())
    log(f"yoso {run_dir.name}: {seconds:.0f} s")
    return seconds


def stage_yoso(out, budget, seed, quiet, device):
    from experiments.digits.evaluate import YOSO_RUNS

    unknown = [r for r in budget["yoso_runs"] if r not in YOSO_RUNS]
    if unknown or "main" not in budget["yoso_runs"]:
        raise StageError(f"yoso_runs must include 'main' and name only {', '.join(YOSO_RUNS)}; got {budget['yoso_runs']}")
    if not TRAIN_SCRIPT.is_file():
        raise StageError(f"the YOSO stage needs the training script {TRAIN_SCRIPT}, which does not exist yet; "
                         "every other stage works without it: rerun with --skip-yoso.")
    n_prompts = prepare_yoso_inputs(out, budget["yoso_runs"])
    return {name: train_yoso_run(out, name, out / "yoso" / name, out / "yoso" / f"{name}.done.json", budget, seed,
                                 n_prompts, quiet, device)
            for name in budget["yoso_runs"]}


def stage_seeds(out, budget, table_seed, seeds, runs, quiet, device, trial=None, yoso_flags=()):
    """The runs of ``runs`` trained again with each seed of ``seeds`` (the table's seed is the table's own run,
    under the same marker, so it is trained here only if the table's stage has not), and their 1-step rows
    evaluated. With ``trial``, every seed is trained anew into the trial's folder, with ``yoso_flags`` added
    (``trial_training_flags``). Returns the evaluated results."""
    from experiments.digits import evaluate as E
    from experiments.digits import seeds as S

    n_prompts = prepare_yoso_inputs(out, runs)
    extra = trial_training_flags(budget, yoso_flags) if trial else ()
    for name in runs:
        for seed in seeds:
            run_dir, marker = S.run_dir(name, seed, table_seed, trial), S.run_marker(name, seed, table_seed, trial)
            train_yoso_run(out, name, out / run_dir, out / marker, budget, seed, n_prompts, quiet, device, extra)
    specs = E.row_specs(with_yoso=False) + S.seed_row_specs(runs, seeds, table_seed, trial)
    return E.evaluate_rows(out, specs, budget["n_per_digit"], batch_size=budget["eval_batch"], quiet=quiet, device=device)


def stage_evaluate(out, budget, with_yoso, quiet, device):
    from experiments.digits import evaluate as E

    specs = E.row_specs(with_yoso=with_yoso, yoso_runs=budget["yoso_runs"])
    t0 = time.time()
    results = E.evaluate_rows(out, specs, budget["n_per_digit"], batch_size=budget["eval_batch"], quiet=quiet, device=device)
    seconds = time.time() - t0
    log(f"evaluation: {len(results)} rows ({seconds:.0f} s)")
    return results, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description="The digits experiment: YOSO-LoRA on a small latent diffusion model.")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a few minutes): checks the pipeline, not the numbers")
    p.add_argument("--out", default=None, help="run folder (default experiments/digits/runs/full or .../quick)")
    p.add_argument("--figures", default=None, help="where the table and figure go (default figures/ for the full run, "
                                                   "OUT/figures for --quick)")
    p.add_argument("--skip-yoso", action="store_true", help="base, teacher and reference rows only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default="cpu", help="torch device for training and sampling (default cpu; the "
                   "budgets are sized for 2 CPU cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one budget entry (JSON value), e.g. --set unet_steps=5000; repeatable")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="instead of the table: train the main and real-data runs with these training seeds (--seed's "
                        "is the table's own run) and write <prefix>_seeds.{md,json}, every seed and the spread")
    p.add_argument("--seed_runs", nargs="+", default=None, metavar="RUN",
                   help="with --seeds: only these runs (default: main real_data)")
    p.add_argument("--trial", default=None, metavar="NAME",
                   help="with --seeds: a recipe trial: every seed is trained anew (with --yoso_flags, 8 checkpoints and a "
                        "tensorboard log) into OUT/trials/NAME/, whose report <prefix>_seeds.{md,json} goes there too; "
                        "the table's and the seed study's runs are not touched")
    p.add_argument("--yoso_flags", default="", metavar="FLAGS",
                   help='with --trial: further train_yoso_lora.py flags for every run of the trial, one string, e.g. '
                        '"--ema_warmup --lr_scheduler cosine --lr_warmup_steps 0"')
    p.add_argument("--health", action="store_true",
                   help="with --trial: score every checkpoint's EMA LoRA at 1 step (HEALTH_PER_DIGIT images a digit) and "
                        "draw D's accuracy (from the tensorboard log) and that quality over training per seed: "
                        "<prefix>_health.{png,json} in --figures")
    args = p.parse_args(argv)
    if args.health and args.trial is None:
        p.error("--health needs --trial NAME (only a trial's runs keep checkpoints and a tracker log), e.g. "
                "--seeds 0 1 2 3 4 --trial baseline --health")
    if args.trial is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.trial):
            p.error(f"--trial {args.trial!r}: use letters, digits, '_', '-' or '.' (it names a folder)")
        if args.seeds is None:
            p.error("--trial needs --seeds (the training seeds of the trial), e.g. --seeds 0 1 2")
        base_keys = [item.partition("=")[0] for item in args.set if not item.startswith("yoso_")]
        if base_keys:
            p.error(f"--trial with --set {base_keys[0]}: only yoso_* budget entries may change in a trial (the base "
                    "model and the evaluation are shared by every trial)")
    if args.yoso_flags and args.trial is None:
        p.error("--yoso_flags needs --trial NAME: without it the runs would replace the table's and the seed study's")
    try:
        args.yoso_flags = shlex.split(args.yoso_flags)
    except ValueError as error:
        p.error(f"--yoso_flags: {error}")

    variant = "quick" if args.quick else "full"
    budget = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in budget:
            p.error(f"--set {item}: unknown budget entry {key!r} (known: {', '.join(budget)})")
        budget[key] = set_value(value)
    yoso_sets = [item for item in args.set if item.startswith("yoso_")]
    if yoso_sets or args.yoso_flags:
        # The budget's YOSO entries and a trial's flags become train_yoso_lora.py arguments: its own parser judges
        # the whole command now, not after the base model has trained.
        from train_yoso_lora import build_parser

        cmd = yoso_command(Path("OUT"), Path("OUT/run"), budget, list(args.yoso_flags), args.seed, args.device)
        given = " ".join([f"--set {' '.join(yoso_sets)}"] * bool(yoso_sets)
                         + [f"--yoso_flags {' '.join(args.yoso_flags)}"] * bool(args.yoso_flags))
        try:
            unknown = build_parser().parse_known_args(cmd[cmd.index(str(TRAIN_SCRIPT)) + 1:])[1]
        except SystemExit:
            p.error(f"{given}: train_yoso_lora.py refuses them (see the line above)")
        if unknown:  # only a trial's flags can hold one: every budget entry maps to a known flag
            p.error(f"--yoso_flags: train_yoso_lora.py has no flag {unknown[0]}")
    out = Path(args.out or REPO / "experiments" / "digits" / "runs" / variant).resolve()
    figures = Path(args.figures or (out / "figures" if args.quick else REPO / "figures")).resolve()
    prefix = "digits" if not args.quick else "digits_quick"
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/digits/run.py" + (" --quick" if args.quick else "") + (" --skip-yoso" if args.skip_yoso else "") \
        + "".join(f" --set {item}" for item in args.set) + (f" --device {args.device}" if args.device != "cpu" else "")
    log(f"{variant} run in {out}")

    timings = {}
    t_all = time.time()
    timings["classifier"] = stage_classifier(out, budget, args.quiet)
    timings["base_model"] = stage_base(out, budget, args.seed, args.quiet, args.device)
    if args.seeds is not None:
        return seeds_report(out, budget, args, figures, prefix, command)
    yoso_seconds = {}
    if not args.skip_yoso:
        yoso_seconds = stage_yoso(out, budget, args.seed, args.quiet, args.device)
        timings["yoso"] = yoso_seconds
    results, timings["evaluation"] = stage_evaluate(out, budget, not args.skip_yoso, args.quiet, args.device)

    from experiments.digits import evaluate as E
    from experiments.digits import report as R

    # Recorded time per stage: a skipped stage reports the time it took when it ran; evaluation sums the rows'
    # recorded times (sampling and metrics).
    timings["evaluation"] = sum(r.get("total_seconds", r.get("seconds", 0.0)) for r in results)
    total_stage_seconds = timings["classifier"] + timings["base_model"] + sum(yoso_seconds.values()) + timings["evaluation"]
    base_summary = json.loads((out / "base_model.json").read_text())
    yoso_runs = {}
    if not args.skip_yoso:
        for name in budget["yoso_runs"]:
            label, extra = E.YOSO_RUNS[name]
            marker = json.loads((out / "yoso" / f"{name}.done.json").read_text())
            cmd = marker.get("command", [])
            script = cmd.index(str(TRAIN_SCRIPT)) if str(TRAIN_SCRIPT) in cmd else 0
            yoso_runs[name] = {"label": label, "extra_flags": extra, "seconds": marker["seconds"], "code": marker.get("code"),
                               "train_yoso_lora_args": [str(a).replace(str(out), "OUT") for a in cmd[script + 1:]]}
    notes = []
    if yoso_runs:
        notes.append(f"YOSO-LoRA budget, every run alike: {budget['yoso_steps']} steps x {budget['yoso_batch']} samples, "
                     f"learning rate {budget['yoso_lr']:g} ({schedule_words(budget)}), LoRA rank {budget['yoso_rank']} / alpha "
                     f"{budget['yoso_alpha']:g}, EMA decay {budget['yoso_ema_decay']:g}, --lambda_con 2 --lambda_kl 0.5; "
                     "every other flag is train_yoso_lora.py's default (--kl_weighting batch, --init_lora_weights "
                     "default, --consistency_loss lpl, --kl_loss mse, --gan_loss_reduction batch). The teacher route "
                     f"trains on {n_prompts_of(out)} captions; the real-data run on the same {n_prompts_of(out)} training "
                     "images with those captions, encoded by the base autoencoder, no teacher. Exact arguments: "
                     "`yoso_runs` in the JSON.")
    meta = {
        "notes": notes,
        "variant": variant,
        "budget": budget,
        "base_model": {k: base_summary[k] for k in base_summary if k not in ("base_dir", "teacher_dir")},
        "yoso_runs": yoso_runs,
        "stage_seconds": timings,
        "total_stage_seconds": total_stage_seconds,
        "total_seconds_this_invocation": time.time() - t_all,
        "torch_threads": __import__("torch").get_num_threads(),
        "device": args.device,
    }
    paths = R.write_report(out, results, figures, prefix, command, meta, n_boot=budget["fd_bootstrap"])
    log("report: " + ", ".join(paths.values()))
    log(f"total {time.time() - t_all:.0f} s")
    return paths


def seeds_report(out, budget, args, figures, prefix, command):
    from experiments.digits import seeds as S

    runs = args.seed_runs or list(S.SEED_RUNS)
    unknown = [r for r in runs if r not in S.SEED_RUNS]
    if unknown:
        raise StageError(f"--seed_runs {' '.join(unknown)}: the seed study covers {', '.join(S.SEED_RUNS)}")
    seeds = sorted(set(args.seeds))
    command += " --seeds " + " ".join(map(str, seeds)) + (" --seed_runs " + " ".join(runs) if args.seed_runs else "")
    if args.trial:
        command += f" --trial {args.trial}" + (f" --yoso_flags {shlex.quote(shlex.join(args.yoso_flags))}" if args.yoso_flags else "")
        figures = out / S.trial_dir(args.trial)
    t0 = time.time()
    results = stage_seeds(out, budget, args.seed, seeds, runs, args.quiet, args.device, args.trial, args.yoso_flags)
    meta = {"budget": {k: budget[k] for k in YOSO_KEYS}, "table_seed": args.seed, "code": code_version(),
            "torch_threads": __import__("torch").get_num_threads(), "seconds_this_invocation": time.time() - t0,
            "trial": args.trial, "yoso_flags": args.yoso_flags,
            "trial_training_flags": trial_training_flags(budget, args.yoso_flags) if args.trial else []}
    paths = S.write_seed_report(results, runs, seeds, figures, prefix, command, meta, args.trial)
    if args.health:
        from experiments.digits import evaluate as E
        from experiments.digits import health as H

        specs = H.health_row_specs(out, S.trial_dir(args.trial), runs, seeds)
        n = min(HEALTH_PER_DIGIT, budget["n_per_digit"])
        scored = E.evaluate_rows(out, specs, n, batch_size=budget["eval_batch"], quiet=args.quiet, device=args.device)
        health_figures = Path(args.figures).resolve() if args.figures else (out / "figures" if args.quick else REPO / "figures")
        paths |= H.write_health_report(out, S.trial_dir(args.trial), runs, seeds, scored, health_figures, prefix,
                                       command + " --health")
    log("seeds report: " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    try:
        main()
    except StageError as error:
        sys.exit(f"run.py: error: {error}")
