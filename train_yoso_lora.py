#!/usr/bin/env python
"""Train a YOSO-LoRA for Stable Diffusion 1.5: a one/two-step generator, trained as a self-cooperative
diffusion GAN ("You Only Sample Once", arXiv 2403.12931). The method is in SPEC.md; the pieces are in yoso/.

    accelerate launch train_yoso_lora.py --pretrained_model_name_or_path=runwayml/stable-diffusion-v1-5 \
        --pretrained_teacher_model=stabilityai/sd-turbo --train_data=train_anno.jsonl --use_ema ...

Reads top to bottom: arguments and checks, models, optimizers and data, the loop, the outputs.
"""

import gc
import logging
import math
import sys
from pathlib import Path

import torch

from yoso.training.checks import ArgumentError, preflight
from yoso.training.checkpoint import latest_checkpoint
from yoso.training.cli import (BAD_INPUT, HelpFormatter, OneLineErrorParser, add_data_arguments, add_model_arguments,
                      add_teacher_arguments)
from yoso.data.prompts import PromptFileError
from yoso.data.image_data import ImageDataError
from yoso.training.interrupt import DiskFullError, Interrupted, StopRequest, free_space, interrupt_message, is_disk_full
from yoso.data.latent_cache import LatentCacheError, check_cache_for_run
from yoso.utils.library_noise import quiet_library_notices
from yoso.method.lora import DEFAULT_TARGET_MODULES, LORA_INITS
from yoso.method.losses import GAN_REDUCTIONS, KL_WEIGHTINGS, LOSS_SPACES
from yoso.utils.precision import fp16_error
from yoso.method.step import NonFiniteLossError, discriminator_chunks_arg

logger = logging.getLogger("train_yoso_lora")


PROG = "train_yoso_lora.py"
FAILED = 1  # exit status of a failure during the work (bad input: BAD_INPUT, 2)


def split_commas(values):
    """``["to_q,to_k", "to_v"]`` -> ``["to_q", "to_k", "to_v"]``: diffusers' LoRA scripts take commas, argparse spaces."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def build_parser():
    p = OneLineErrorParser(prog=PROG, formatter_class=HelpFormatter,
                           description="Train a YOSO-LoRA (one/two-step SD1.5) with a self-cooperative diffusion GAN.")
    # Models
    add_model_arguments(p)
    p.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                   help="Override the base scheduler's prediction_type (default: the base scheduler's; SD1.5: epsilon).")
    # Data
    add_data_arguments(p)
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="Threads that decode images (--train_data_dir / --dataset_name); prompts need none.")
    # Teacher
    add_teacher_arguments(p)
    p.add_argument("--teacher_latent_cache", default=None, metavar="DIR",
                   help="Train from latents made by precompute_teacher_latents.py (same teacher, resolution, teacher "
                        "settings, --seed, prompts) instead of running the teacher; epochs past the cache reuse it cyclically. "
                        "Default: none, the teacher runs.")
    # Method (SPEC sections 2 and 4)
    p.add_argument("--lambda_con", type=float, default=2.0, help="Weight of the latent perceptual consistency loss.")
    p.add_argument("--lambda_kl", type=float, default=0.5, help="Weight of the MSE to the teacher latents.")
    p.add_argument("--lambda_adv", type=float, default=1.0, help="Weight of the adversarial loss (0: D trains, G ignores it).")
    p.add_argument("--snr_gamma", type=float, default=5.0, help="Cap of the SNR and consistency weights.")
    p.add_argument("--coop_gap", type=int, default=250, help="t_d = max(t - gap, 0): the cooperative 'real' sample.")
    p.add_argument("--consistency_gap", type=int, default=25, help="t_p = max(t - gap, 0): the consistency target.")
    p.add_argument("--gan_loss_reduction", default="batch", choices=GAN_REDUCTIONS,
                   help="'batch': softplus of the batch-mean logit (public script); 'sample': mean of per-sample softplus (paper).")
    p.add_argument("--kl_weighting", default="batch", choices=KL_WEIGHTINGS,
                   help="Weight of the data loss: 'batch': mean_b(min(SNR(t), gamma)) x MSE over the batch, what the released "
                        "script computes; 'sample': per-sample min(SNR(t), gamma) x that sample's MSE (SPEC section 2).")
    p.add_argument("--consistency_loss", default="lpl", choices=LOSS_SPACES,
                   help="'lpl': latent perceptual (through the UNet's encoder half); 'mse': in latent space, no feature-net pass.")
    p.add_argument("--kl_loss", default="mse", choices=LOSS_SPACES,
                   help="'mse': the data loss in latent space; 'lpl': through the feature net, like the consistency loss.")
    p.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (per-channel constant added to the noise); 0: off.")
    p.add_argument("--input_perturbation", type=float, default=0.0,
                   help="Noise x_t with eps + p * fresh noise (x_td and x_tp keep eps), as the released script; 0: off.")
    p.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="A non-finite D or G loss skips that optimizer's update; this many skipped steps in a row stop the run.")
    # LoRA and EMA
    p.add_argument("--lora_rank", type=int, default=64, help="Rank of the LoRA (fixed for a run: a resume must keep it).")
    p.add_argument("--lora_alpha", type=float, default=8, help="LoRA alpha: the LoRA's scale is alpha / rank.")
    p.add_argument("--lora_target_modules", nargs="+", default=list(DEFAULT_TARGET_MODULES), metavar="NAME",
                   help="UNet modules that get a LoRA, by name or dotted name suffix, separated by spaces or commas "
                        "(to_q,to_k,to_v,to_out.0).")
    p.add_argument("--init_lora_weights", default="default", choices=LORA_INITS,
                   help="'default': peft's (A Kaiming-uniform, B zero), as the released script; 'gaussian': diffusers' examples'.")
    p.add_argument("--use_ema", action="store_true", help="Keep an EMA of the LoRA; it becomes the final LoRA.")
    p.add_argument("--ema_decay", type=float, default=0.999, help="Decay of the LoRA's EMA, per optimizer step.")
    p.add_argument("--ema_warmup", action="store_true",
                   help="Warm the EMA up as diffusers' EMAModel(use_ema_warmup=True): the k-th update's decay is "
                        "min(--ema_decay, 1 - (1 + (k - 1) / --ema_inv_gamma) ** -(--ema_power)) (default: off, "
                        "--ema_decay from the first update, as released).")
    p.add_argument("--ema_inv_gamma", type=float, default=1.0, help="inv_gamma of --ema_warmup (diffusers' default 1).")
    p.add_argument("--ema_power", type=float, default=2 / 3, help="power of --ema_warmup (diffusers' default 2/3).")
    # Optimization
    p.add_argument("--output_dir", default="yoso-lora-output", help="Where the LoRA, checkpoints, validation images and logs go.")
    p.add_argument("--seed", type=int, default=0, help="Seeds the LoRA's and D's initial values, the data order and every step's noise.")
    p.add_argument("--train_batch_size", type=int, default=16, help="Prompts per process per micro-step.")
    p.add_argument("--num_train_epochs", type=int, default=None, help="Epochs over the data; give it or --max_train_steps (default: none).")
    p.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs (default: none).")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute the UNet's and D's activations in the backward pass: less memory, more compute (default: off).")
    p.add_argument("--learning_rate", type=float, default=2e-5, help="Learning rate of the LoRA.")
    p.add_argument("--discriminator_learning_rate", type=float, default=None, help="Learning rate of D (default: --learning_rate).")
    p.add_argument("--scale_lr", action="store_true", help="Multiply learning rates by accumulation x batch x processes.")
    p.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
                   help="Schedule of the LoRA's learning rate (D's stays constant).")
    p.add_argument("--lr_warmup_steps", type=int, default=500,
                   help="Warm-up steps of the *_with_warmup, linear, cosine and polynomial schedules (the constant schedule has none).")
    p.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 of the LoRA's optimizer (D's is 0).")
    p.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 of both optimizers.")
    p.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay of both optimizers.")
    p.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon of both optimizers.")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip the LoRA's gradient to this norm (D's is not clipped).")
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit for the LoRA and D (CUDA; default: torch's AdamW).")
    p.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matrix products on Ampere and newer GPUs (default: off).")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Frozen weights run in this dtype; LoRA and D stay fp32 (default: accelerate's config).")
    p.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (CUDA; default: PyTorch's SDPA attention).")
    p.add_argument("--torch_compile", action="store_true",
                   help="torch.compile each resnet and transformer block of the UNet and D (regional compilation: the "
                        "LoRA layers compile with them); the first steps take longer (default: off, not yet measured on a GPU).")
    p.add_argument("--channels_last", action="store_true",
                   help="Run the UNet's and D's convolutions in channels-last layout (default: off, not yet measured on a GPU).")
    p.add_argument("--adam_fused", default="auto", choices=["auto", "on", "off"],
                   help="torch's fused AdamW kernel for the LoRA and D (the same update); auto: on CUDA.")
    p.add_argument("--step_order", default="generator_first", choices=["generator_first", "discriminator_first"],
                   help="discriminator_first: D's update before G's pass with gradient (a no-grad fake), so G's graph "
                        "is not alive during it; one more no-grad G pass. Same losses; another memory peak.")
    p.add_argument("--discriminator_chunks", type=discriminator_chunks_arg, default=1,
                   help="Run D's update on [real ; fake] in this many pieces (1, or even: 2 = real, then fake); "
                        "less memory for D's graph, the same gradient.")
    p.add_argument("--generator_chunks", type=int, default=1,
                   help="Run F's and D's passes on G's output (G's losses) in this many pieces of the batch, each "
                        "backpropagated at once: less memory for their graphs, the same gradient (default: 1).")
    # Checkpoints, validation, logging, hub
    p.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint-<step> folder every N optimizer steps.")
    p.add_argument("--checkpoint_on_interrupt", action="store_true",
                   help="On Ctrl-C (SIGINT) or SIGTERM, save a checkpoint at the step where training stops "
                        "(default: off, the last regular checkpoint is the one to resume from).")
    p.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="Keep at most N checkpoints, deleting the oldest (default: keep all).")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (the newest in --output_dir; none: a new run), or a checkpoint-<step> folder: a path, or a "
                        "name inside --output_dir. Its --resolution, --lora_* flags, --use_ema, --use_8bit_adam and base UNet "
                        "must stay as they were (default: none, a new run).")
    p.add_argument("--validation_prompts", nargs="+", default=None, metavar="PROMPT",
                   help="Prompts for validation grids (1 and 2 LCM steps, LoRA and EMA) every --validation_steps (default: none).")
    p.add_argument("--validation_steps", type=int, default=500, help="Validation every N optimizer steps.")
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none.")
    p.add_argument("--health_window", type=int, default=50,
                   help="Warn (one line, once per episode) when the discriminator wins outright (accuracy >= 0.99) or "
                        "collapses (accuracy ~0.5 while G's adversarial loss falls) for this many consecutive optimizer "
                        "steps; 0: no warnings. The health scalars are logged either way (docs/training.md).")
    p.add_argument("--logging_dir", default="logs", help="Tracker folder, inside --output_dir.")
    p.add_argument("--tracker_project_name", default="yoso-lora", help="Project name for the trackers.")
    p.add_argument("--save_kohya", action="store_true",
                   help="Also write pytorch_lora_weights_kohya.safetensors beside each final LoRA (AUTOMATIC1111, ComfyUI); "
                        "convert_lora_to_kohya.py makes it later from any output or checkpoint folder.")
    p.add_argument("--push_to_hub", action="store_true",
                   help="Upload the final LoRA, model card, latent statistics and validation grids to the Hub (default: off).")
    p.add_argument("--hub_model_id", default=None, help="Hub repository for --push_to_hub (default: the --output_dir folder's name).")
    p.add_argument("--hub_token", default=None, help="Hub token for --push_to_hub (default: the one `hf auth login` stored).")
    p.add_argument("--check_only", action="store_true",
                   help="Validate every flag and input as a run would (prompt file, model configs, checkpoint to resume), "
                        "load no model, write nothing, and exit: 0 when all is well, 2 with the one-line error (default: off).")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.lora_target_modules = split_commas(args.lora_target_modules)
    if not args.lora_target_modules:
        parser.error("--lora_target_modules: no module names given")
    if args.ema_warmup and not args.use_ema:
        parser.error("--ema_warmup: there is no EMA to warm up; add --use_ema or drop --ema_warmup")
    if args.ema_inv_gamma <= 0 or args.ema_power <= 0:
        parser.error(f"--ema_inv_gamma {args.ema_inv_gamma} --ema_power {args.ema_power}: both must be > 0")
    if args.health_window < 0:
        parser.error(f"--health_window {args.health_window}: give 0 (no warnings) or a number of optimizer steps")
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        parser.error("--hub_token with --report_to=wandb would expose the token; use `hf auth login` instead")
    return args


def fail(message, code=BAD_INPUT):
    """The script's one-line error on stderr, then exit: 2 for bad input, 1 for a failure during the work."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def check_summary(args, checked, num_processes):
    """--check_only's one line on success: what the run would train on."""
    base = f"base {args.pretrained_model_name_or_path}"
    if checked.prompts is None:
        flag = "dataset_name" if args.dataset_name else "train_data_dir"
        data = f"images from --{flag} {getattr(args, flag)}, {base}"
        if args.teacher_latent_cache:
            data += f", their latents from {args.teacher_latent_cache}"
    elif args.teacher_latent_cache:
        data = f"{len(checked.prompts)} prompts, {base}, teacher latents from {args.teacher_latent_cache}"
    else:
        data = f"{len(checked.prompts)} prompts, {base}, teacher {args.pretrained_teacher_model}"
    resume = f", resuming {args.resume_from_checkpoint}" if args.resume_from_checkpoint not in (None, "latest") else ""
    processes = f"{num_processes} process" + ("es" if num_processes > 1 else "")
    return f"{PROG}: checks passed ({data}, {processes}{resume}); no model was loaded"


def main(argv=None):
    args = parse_args(argv)
    quiet_library_notices()
    try:
        checked = preflight(args)
        if args.teacher_latent_cache:
            check_cache_for_run(args, checked.prompts, checked.teacher_plan)
    except (ArgumentError, PromptFileError, LatentCacheError, ImageDataError) as error:
        fail(str(error))

    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed

    global logger
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    precision_error = fp16_error(accelerator)
    if precision_error:  # still before any model loads
        fail(precision_error)
    if args.check_only:
        if accelerator.is_main_process:
            print(check_summary(args, checked, accelerator.num_processes))
        accelerator.end_training()
        return
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger = get_logger("train_yoso_lora")
    logger.info(accelerator.state, main_process_only=False)
    # Warnings only: the libraries' info messages (every weight file found, every config default filled in)
    # would bury the progress bar and the run's own messages.
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)  # the LoRA's and D head's initial values; DDP broadcasts rank 0's anyway
    created_output_dir = accelerator.is_main_process and not output_dir.exists()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    try:
        with StopRequest() as stop:
            run = train(args, checked, accelerator, output_dir, stop)
    except Interrupted as interrupt:
        # Ctrl-C / SIGTERM: stopped at the end of an optimizer step (or at once, before the loop or on a second
        # signal); checkpoints are whole or absent, the final outputs are not written.
        if accelerator.is_main_process:
            print(f"{PROG}: {interrupt_message(interrupt.step, latest_checkpoint(output_dir))}", file=sys.stderr)
        finish_early(accelerator, created_output_dir, output_dir)
        sys.exit(interrupt.exit_code)
    except OSError as error:
        if not is_disk_full(error):
            raise
        if not isinstance(error, DiskFullError):
            error = f"no space left on the device while writing {error.filename or output_dir} " \
                    f"({free_space(output_dir)} free there)"
        if accelerator.is_main_process:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        finish_early(accelerator, created_output_dir, output_dir)
        sys.exit(FAILED)
    except (PromptFileError, ImageDataError) as error:
        # Data found unusable when it opens (an image dataset's row count is known only then), before any
        # model loads: leave no empty output folder behind.
        if created_output_dir and not any(output_dir.iterdir()):
            output_dir.rmdir()
        fail(str(error))
    except NonFiniteLossError as error:
        # Nothing is saved on this path: the last checkpoint and any earlier outputs stay as they were.
        last = latest_checkpoint(output_dir)
        if accelerator.is_main_process:
            print(f"{PROG}: error: {error}; training stopped and nothing was written. "
                  f"Last good checkpoint: {last or 'none'}. Lower --learning_rate, or resume with another --seed.",
                  file=sys.stderr)
        accelerator.free_memory()
        gc.collect()
        accelerator.end_training()
        sys.exit(FAILED)
    # Free the models (the run and the accelerator's references) before end_training: tearing
    # down the process group with them alive aborts some multi-process runs at exit.
    del run
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def finish_early(accelerator, created_output_dir, output_dir):
    """Free the models and close the trackers of a run that stops before its end; an output folder this run
    created and left empty is removed."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    if created_output_dir and output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()


def train(args, checked, accelerator, output_dir, stop=None):
    """Build, resume, loop, save. Returns the run (its models still alive) for the caller to free."""
    from tqdm.auto import tqdm

    from yoso.training.checkpoint import TrainState, latest_checkpoint, register_checkpointing, save_checkpoint
    from yoso.outputs.hub import create_hub_repo, default_repo_name, push_to_hub
    from yoso.data.latent_stats import LatentStats
    from yoso.outputs.final_save import save_final_outputs
    from yoso.training.builder import RunSettings, build_run
    from yoso.method.step import step_generator
    from yoso.method.health import HealthMonitor, ema_distance
    from yoso.training.tracking import LossAverager
    from yoso.data.training_data import open_training_data
    from yoso.outputs.output_files import start_validation_record
    from yoso.training.validation import generate_validation_images, save_and_log_validation

    # ---- build --------------------------------------------------------------------------------------
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.push_to_hub and accelerator.is_main_process:  # a missing Hub login shows now, not after training
        args.hub_model_id = create_hub_repo(args.hub_model_id or default_repo_name(output_dir), token=args.hub_token)
    data = open_training_data(args, checked.prompts, accelerator)
    max_train_steps = args.max_train_steps or args.num_train_epochs * math.ceil(
        data.batches_per_epoch / args.gradient_accumulation_steps)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    teacher = None if data.kind == "images" else args.pretrained_teacher_model
    transcode = checked.teacher_plan is not None and checked.teacher_plan.transcode
    if transcode:
        logger.info(f"teacher latents: {checked.teacher_plan.reason}")
    run = build_run(RunSettings.from_args(args, pretrained_teacher_model=teacher, transcode_teacher_latents=transcode),
                    accelerator, num_training_steps=max_train_steps)
    models, trainer = run.models, run.trainer
    if args.teacher_latent_cache:
        from yoso.data.latent_cache import open_cache_for_run

        data.latent_cache = open_cache_for_run(args.teacher_latent_cache, accelerator, models.weight_dtype, logger,
                                               max_train_steps * args.gradient_accumulation_steps,
                                               data.batches_per_epoch, args.train_batch_size)
    state = TrainState()
    latent_stats = LatentStats(models.latent_shape, accelerator.device)
    register_checkpointing(run, [state, latent_stats, run.ema])

    # ---- resume -------------------------------------------------------------------------------------
    path = None
    if args.resume_from_checkpoint:
        path = latest_checkpoint(output_dir) if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if path is None:
            logger.info(f"no checkpoint in {output_dir}: starting a new run")
        else:
            logger.info(f"resuming from {path}")
            accelerator.load_state(str(path))
    if accelerator.is_main_process:  # an earlier run's validation grids are not this LoRA's (card, Hub)
        start_validation_record(output_dir, resumed=path is not None)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config={k: str(v) for k, v in vars(args).items()})
    batches = data.batches(models, start_batch=state.micro_steps)

    total_batch = args.train_batch_size * world * args.gradient_accumulation_steps
    logger.info(f"***** YOSO-LoRA training: {data.describe()}, {max_train_steps} steps of {total_batch} samples "
                f"({args.train_batch_size} x {world} processes x {args.gradient_accumulation_steps} accumulation) *****")

    # ---- the loop -----------------------------------------------------------------------------------
    progress = tqdm(range(max_train_steps), initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    losses = LossAverager(accelerator, args.gradient_accumulation_steps)
    health = HealthMonitor(args.health_window)
    run.unet.train()
    run.discriminator.train()
    stop = stop or StopRequest()
    stop.step, stop.defer = state.global_step, True  # a signal now stops the loop at the end of its optimizer step
    try:
        while state.global_step < max_train_steps:
            batch = next(batches)
            with accelerator.accumulate(run.unet, run.discriminator):
                try:
                    logs = trainer.step(batch, step_generator(args.seed, state.micro_steps, rank))
                except NonFiniteLossError as error:
                    raise NonFiniteLossError(f"at step {state.global_step + 1}, {error}") from None
            state.micro_steps += 1
            latent_stats.update(accelerator.gather(logs.pop("x0")))
            grad_norm, d_grad_norm, nonfinite = logs.pop("grad_norm"), logs.pop("d_grad_norm"), logs.pop("nonfinite")
            losses.add(logs)
            if not accelerator.sync_gradients:
                continue

            state.global_step += 1
            progress.update(1)
            if nonfinite:
                state.nonfinite_steps += 1
                logger.warning(f"step {state.global_step}: {nonfinite}")
            once = {"grad_norm": grad_norm, "d_grad_norm": d_grad_norm}
            if run.ema is not None:
                once["ema_distance"] = ema_distance(run.ema)
            scalars = losses.means(once)
            scalars.update(lr=run.lr_scheduler.get_last_lr()[0], nonfinite_steps=state.nonfinite_steps)
            if run.ema is not None and run.ema.last_decay is not None:
                scalars["ema_decay"] = run.ema.last_decay
            accelerator.log(scalars, step=state.global_step)
            warning = health.observe(state.global_step, scalars)
            if warning:
                logger.warning(warning)
            progress.set_postfix({k: f"{scalars[k]:.4f}" for k in ("loss_con", "loss_kl", "loss_adv", "loss_d")})

            if state.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, state.global_step, args.checkpoints_total_limit, logger)
            if args.validation_prompts and state.global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    columns, images = generate_validation_images(
                        run.unet_module, models.vae, models.text_encoder, models.tokenizer,
                        models.noise_scheduler.config, args.validation_prompts, args.seed, args.resolution,
                        accelerator.device, accelerator.autocast, run.ema)
                    path = save_and_log_validation(accelerator, columns, images, args.validation_prompts,
                                                   state.global_step, output_dir)
                    logger.info(f"validation images: {path}")
                accelerator.wait_for_everyone()
            stop.step = state.global_step
            signum = stop.requested(accelerator)  # every process stops at the same step
            if signum:
                if args.checkpoint_on_interrupt and state.global_step % args.checkpointing_steps:
                    save_checkpoint(accelerator, output_dir, state.global_step, args.checkpoints_total_limit, logger)
                raise Interrupted(signum, state.global_step)
    finally:
        stop.defer = False
        progress.close()
        batches.close()  # joins the data's reader threads now, not at interpreter exit

    # ---- save ---------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if data.kind == "images":
        skipped = int(accelerator.reduce(torch.tensor([data.skipped], device=accelerator.device), "sum").item())
        logger.info(f"unreadable images skipped (replaced by the next readable one): {skipped}")
    if accelerator.is_main_process:
        num_samples = len(data.prompts) if data.kind == "prompts" else (
            getattr(data, "num_samples", None) or getattr(getattr(data, "source", None), "num_samples", None))
        save_final_outputs(run, output_dir, latent_stats, args, logger, num_samples=num_samples)
        if args.push_to_hub:
            url = push_to_hub(output_dir, args.hub_model_id or default_repo_name(output_dir), token=args.hub_token,
                              args_dict=vars(args), num_processes=world)
            logger.info(f"uploaded to {url}")
    return run


if __name__ == "__main__":
    main()
