#!/usr/bin/env python
"""Train a YOSO-LoRA for Stable Diffusion 1.5: a one/two-step generator, trained as a self-cooperative
diffusion GAN ("You Only Sample Once", arXiv 2403.12931). The method is in SPEC.md; the pieces are in yoso/.

    accelerate launch train_yoso_lora.py --pretrained_model_name_or_path=runwayml/stable-diffusion-v1-5 \
        --pretrained_teacher_model=stabilityai/sd-turbo --train_data=train_anno.jsonl --use_ema ...

Reads top to bottom: arguments and checks, models, optimizers and data, the loop, the outputs.
"""

import argparse
import gc
import logging
import math
import os
import sys
from pathlib import Path

import torch

from yoso.checks import ArgumentError, preflight
from yoso.checkpoint import latest_checkpoint
from yoso.data import PromptFileError
from yoso.latent_cache import LatentCacheError, check_cache_for_run
from yoso.lora import DEFAULT_TARGET_MODULES
from yoso.losses import GAN_REDUCTIONS
from yoso.precision import fp16_error
from yoso.step import NonFiniteLossError

logger = logging.getLogger("train_yoso_lora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a YOSO-LoRA (one/two-step SD1.5) with a self-cooperative diffusion GAN.")
    # Models
    p.add_argument("--pretrained_model_name_or_path", default="runwayml/stable-diffusion-v1-5",
                   help="Base model (SD1.5 family): a diffusers folder or hub id. The LoRA is trained on its UNet.")
    p.add_argument("--pretrained_teacher_model", default="stabilityai/sd-turbo",
                   help="Pipeline that turns prompts into training latents; must share the base model's latent space.")
    p.add_argument("--revision", default=None, help="Revision of the base model on the Hub.")
    p.add_argument("--variant", default=None, help="Weight variant of the base model files, e.g. fp16.")
    p.add_argument("--cache_dir", default=None, help="Where downloaded models are cached.")
    p.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                   help="Override the base scheduler's prediction_type (SD1.5: epsilon).")
    # Data
    p.add_argument("--train_data", default="train_anno.jsonl",
                   help="Prompt file: .jsonl (text in --caption_column) or .txt (one prompt a line); see prepare_journeydb.py.")
    p.add_argument("--caption_column", default="prompt", help="JSON field that holds the prompt in a .jsonl --train_data.")
    p.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--resolution", type=int, default=512, help="Image side in pixels (SD1.5: a multiple of 64).")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="Worker processes that tokenize prompts.")
    # Teacher
    p.add_argument("--teacher_num_inference_steps", type=int, default=1)
    p.add_argument("--teacher_guidance_scale", type=float, default=0.0)
    p.add_argument("--teacher_latent_cache", default=None, metavar="DIR",
                   help="Train from latents made by precompute_teacher_latents.py (same teacher, resolution, teacher "
                        "settings, --seed, prompts) instead of running the teacher; epochs past the cache reuse it cyclically.")
    # Method (SPEC sections 2 and 4)
    p.add_argument("--lambda_con", type=float, default=2.0, help="Weight of the latent perceptual consistency loss.")
    p.add_argument("--lambda_kl", type=float, default=0.5, help="Weight of the MSE to the teacher latents.")
    p.add_argument("--lambda_adv", type=float, default=1.0, help="Weight of the adversarial loss (0: D trains, G ignores it).")
    p.add_argument("--snr_gamma", type=float, default=5.0, help="Cap of the SNR and consistency weights.")
    p.add_argument("--coop_gap", type=int, default=250, help="t_d = max(t - gap, 0): the cooperative 'real' sample.")
    p.add_argument("--consistency_gap", type=int, default=25, help="t_p = max(t - gap, 0): the consistency target.")
    p.add_argument("--gan_loss_reduction", default="batch", choices=GAN_REDUCTIONS,
                   help="'batch': softplus of the batch-mean logit (public script); 'sample': mean of per-sample softplus (paper).")
    p.add_argument("--noise_offset", type=float, default=0.0)
    # LoRA and EMA
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--lora_alpha", type=float, default=8)
    p.add_argument("--lora_target_modules", nargs="+", default=list(DEFAULT_TARGET_MODULES))
    p.add_argument("--use_ema", action="store_true", help="Keep an EMA of the LoRA; it becomes the final LoRA.")
    p.add_argument("--ema_decay", type=float, default=0.999)
    # Optimization
    p.add_argument("--output_dir", default="yoso-lora-output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_batch_size", type=int, default=16, help="Prompts per process per micro-step.")
    p.add_argument("--num_train_epochs", type=int, default=None)
    p.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--discriminator_learning_rate", type=float, default=None, help="Default: --learning_rate.")
    p.add_argument("--scale_lr", action="store_true", help="Multiply learning rates by accumulation x batch x processes.")
    p.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit for the LoRA.")
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Default: accelerate's config. Frozen weights run in this dtype; LoRA and D stay fp32.")
    p.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    # Checkpoints, validation, logging, hub
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder.")
    p.add_argument("--validation_prompts", nargs="+", default=None)
    p.add_argument("--validation_steps", type=int, default=500)
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none.")
    p.add_argument("--logging_dir", default="logs", help="Tracker folder, inside --output_dir.")
    p.add_argument("--tracker_project_name", default="yoso-lora")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    args = p.parse_args(argv)
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        p.error("--hub_token with --report_to=wandb would expose the token; use `hf auth login` instead")
    return args


class TrainState:
    """Counters that a checkpoint must restore: optimizer steps, and micro-steps (= batches consumed)."""

    def __init__(self):
        self.global_step = 0
        self.micro_steps = 0

    def state_dict(self):
        return {"global_step": self.global_step, "micro_steps": self.micro_steps}

    def load_state_dict(self, state):
        self.global_step, self.micro_steps = int(state["global_step"]), int(state["micro_steps"])


def step_generator(seed, micro_step, rank):
    """The step's own RNG for eps and t: a function of (seed, micro-step, rank), so resuming is exact and
    validation (which draws from other generators) cannot shift it."""
    return torch.Generator().manual_seed((seed * 7_919 + micro_step * 104_729 + rank * 1_299_709) % (2**63 - 1))


def main(argv=None):
    args = parse_args(argv)
    try:
        prompts = preflight(args)
        if args.teacher_latent_cache:
            check_cache_for_run(args, prompts)
    except (ArgumentError, PromptFileError, LatentCacheError) as error:
        sys.exit(f"train_yoso_lora.py: error: {error}")

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
        sys.exit(f"train_yoso_lora.py: error: {precision_error}")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger = get_logger("train_yoso_lora")
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)  # the LoRA's and D head's initial values; DDP broadcasts rank 0's anyway
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    try:
        train(args, prompts, accelerator, output_dir)
    except NonFiniteLossError as error:
        # Nothing is saved on this path: the last checkpoint and any earlier outputs stay as they were.
        last = latest_checkpoint(output_dir)
        if accelerator.is_main_process:
            print(f"train_yoso_lora.py: error: {error}; training stopped and nothing was written. "
                  f"Last good checkpoint: {last or 'none'}. Lower --learning_rate, or resume with another --seed.",
                  file=sys.stderr)
        accelerator.free_memory()
        gc.collect()
        accelerator.end_training()
        sys.exit(1)
    # Free the models (train's locals and the accelerator's references) before end_training: tearing
    # down the process group with them alive aborts some multi-process runs at exit.
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def train(args, prompts, accelerator, output_dir):
    from diffusers.optimization import get_scheduler
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from yoso import checkpoint as ckpt
    from yoso.data import ShardedPromptSampler
    from yoso.ema import LoRAEMA
    from yoso.lora import load_lora_into_unet, lora_named_parameters, save_lora
    from yoso.models import load_models, make_optimizers
    from yoso.step import YOSOLossConfig, YOSOTrainingStep
    from yoso.latent_stats import LATENT_STATS_NAME, LatentStats
    from yoso.validation import generate_validation_images, save_and_log_validation

    # ---- models -------------------------------------------------------------------------------------
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    models = load_models(
        args.pretrained_model_name_or_path, None if args.teacher_latent_cache else args.pretrained_teacher_model,
        args.resolution, accelerator.device,
        weight_dtype, args.lora_rank, args.lora_alpha, args.lora_target_modules, args.gradient_checkpointing,
        args.prediction_type, args.teacher_num_inference_steps, args.teacher_guidance_scale,
        args.revision, args.variant, args.cache_dir, args.enable_xformers_memory_efficient_attention,
    )
    tokenizer, text_encoder, vae = models.tokenizer, models.text_encoder, models.vae
    unet, discriminator = models.unet, models.discriminator
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- optimizers, data, schedule of steps ---------------------------------------------------------
    world = accelerator.num_processes
    scale = args.gradient_accumulation_steps * args.train_batch_size * world if args.scale_lr else 1
    lr_g = args.learning_rate * scale
    lr_d = (args.discriminator_learning_rate or args.learning_rate) * scale
    optimizer_g, optimizer_d = make_optimizers(unet, discriminator, lr_g, lr_d, (args.adam_beta1, args.adam_beta2),
                                               args.adam_weight_decay, args.adam_epsilon, args.use_8bit_adam)

    sampler = ShardedPromptSampler(len(prompts), args.train_batch_size, world, accelerator.process_index, args.seed)
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    latent_cache = None
    if args.teacher_latent_cache:
        from yoso.latent_cache import open_cache_for_run

        latent_cache = open_cache_for_run(args.teacher_latent_cache, accelerator, weight_dtype, logger,
                                          max_train_steps * args.gradient_accumulation_steps, sampler.batches_per_epoch,
                                          args.train_batch_size)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer_g,
                                 num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=max_train_steps * world)
    unet, discriminator, optimizer_g, optimizer_d, lr_scheduler = accelerator.prepare(
        unet, discriminator, optimizer_g, optimizer_d, lr_scheduler)
    unet_module = accelerator.unwrap_model(unet)
    discriminator_module = accelerator.unwrap_model(discriminator)

    ema = LoRAEMA(lora_named_parameters(unet_module), args.ema_decay) if args.use_ema else None
    latent_stats = LatentStats(models.latent_shape)
    state = TrainState()
    trainer = YOSOTrainingStep(
        accelerator, unet, discriminator, models.feature_net, text_encoder, models.latent_source, models.schedule,
        optimizer_g, optimizer_d, lr_scheduler, ema,
        YOSOLossConfig(args.lambda_con, args.lambda_kl, args.lambda_adv, args.snr_gamma, args.coop_gap,
                       args.consistency_gap, args.gan_loss_reduction, args.noise_offset, args.max_grad_norm),
        models.latent_shape, seed=args.seed,
    )
    # accelerate saves its own (G's) scaler as scaler.pt; D's fp16 scaler is registered here, last.
    checkpointed = [state, latent_stats, ema, trainer.discriminator_scaler]
    for obj in (o for o in checkpointed if o is not None):
        accelerator.register_for_checkpointing(obj)

    # Checkpoints hold the LoRA (diffusers format) and D, not the 860M frozen base weights.
    def save_model_hook(_models, weights, folder):
        if accelerator.is_main_process:
            save_lora(unet_module, folder)
            save_file({k: v.detach().cpu().contiguous() for k, v in discriminator_module.state_dict().items()},
                      os.path.join(folder, "discriminator.safetensors"))
        weights.clear()  # saved above; accelerate must not write the full (860M) UNet

    def load_model_hook(prepared_models, folder):
        load_lora_into_unet(unet_module, folder)
        discriminator_module.load_state_dict(load_file(os.path.join(folder, "discriminator.safetensors")))
        prepared_models.clear()  # loaded above; accelerate must not look for full model weights

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    def save_checkpoint():
        tmp = ckpt.incomplete_path(output_dir, state.global_step)
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = ckpt.finalize(output_dir, state.global_step)
            for removed in ckpt.prune(output_dir, args.checkpoints_total_limit):
                logger.info(f"removed old checkpoint {removed}")
            logger.info(f"saved {final}")
        accelerator.wait_for_everyone()

    if args.resume_from_checkpoint:
        path = ckpt.latest_checkpoint(output_dir) if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if path is None:
            logger.info(f"no checkpoint in {output_dir}: starting a new run")
        else:
            logger.info(f"resuming from {path}")
            accelerator.load_state(str(path))
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config={k: str(v) for k, v in vars(args).items()})

    def tokenize(indices):
        batch_prompts = [prompts[i] for i in indices]
        ids = tokenizer(batch_prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return batch_prompts, ids

    batches = sampler.batches(start_batch=state.micro_steps)
    if args.dataloader_num_workers > 0:
        batches = _prefetch_tokenized(batches, tokenize, args.dataloader_num_workers)
    else:
        batches = ((epoch, b, indices, *tokenize(indices)) for epoch, b, indices in batches)

    total_batch = args.train_batch_size * world * args.gradient_accumulation_steps
    logger.info(f"***** YOSO-LoRA training: {len(prompts)} prompts, {max_train_steps} steps of {total_batch} prompts "
                f"({args.train_batch_size} x {world} processes x {args.gradient_accumulation_steps} accumulation) *****")

    # ---- the loop -----------------------------------------------------------------------------------
    progress = tqdm(range(max_train_steps), initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    running = {}
    unet.train()
    discriminator.train()
    try:
        while state.global_step < max_train_steps:
            epoch, _, indices, batch_prompts, input_ids = next(batches)
            batch = {"prompts": batch_prompts, "input_ids": input_ids, "indices": indices, "epoch": epoch}
            if latent_cache is not None:
                batch["latents"] = latent_cache.latents(epoch, indices)
            generator = step_generator(args.seed, state.micro_steps, accelerator.process_index)
            with accelerator.accumulate(unet, discriminator):
                try:
                    logs = trainer.step(batch, generator)
                except NonFiniteLossError as error:
                    raise NonFiniteLossError(f"at step {state.global_step + 1}, {error}") from None
            state.micro_steps += 1
            latent_stats.update(accelerator.gather(logs.pop("x0")))
            grad_norm = logs.pop("grad_norm")
            for key, value in logs.items():
                running[key] = running.get(key, 0.0) + value
            if not accelerator.sync_gradients:
                continue

            state.global_step += 1
            progress.update(1)
            means = accelerator.gather(torch.stack([running[k] for k in running])).view(world, -1).mean(0)
            scalars = {k: v.item() / args.gradient_accumulation_steps for k, v in zip(running, means)}
            scalars.update(lr=lr_scheduler.get_last_lr()[0], grad_norm=float(grad_norm) if grad_norm is not None else 0.0)
            running = {}
            accelerator.log(scalars, step=state.global_step)
            progress.set_postfix({k: f"{scalars[k]:.4f}" for k in ("loss_con", "loss_kl", "loss_adv", "loss_d")})

            if state.global_step % args.checkpointing_steps == 0:
                save_checkpoint()
            if args.validation_prompts and state.global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    columns, images = generate_validation_images(
                        unet_module, vae, text_encoder, tokenizer, models.noise_scheduler.config, args.validation_prompts,
                        args.seed, args.resolution, accelerator.device, accelerator.autocast, ema)
                    path = save_and_log_validation(accelerator, columns, images, args.validation_prompts,
                                                   state.global_step, output_dir)
                    logger.info(f"validation images: {path}")
                accelerator.wait_for_everyone()
    finally:
        progress.close()

    # ---- outputs ------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    _dump_rank_weights_for_tests(accelerator, unet_module, discriminator_module)
    if accelerator.is_main_process:
        if ema is not None:
            save_lora(unet_module, output_dir, tensors=ema.named_tensors())
            save_lora(unet_module, output_dir / "non_ema")
        else:
            save_lora(unet_module, output_dir)
        latent_stats.save(output_dir / LATENT_STATS_NAME)
        logger.info(f"LoRA written to {output_dir / 'pytorch_lora_weights.safetensors'}"
                    + (" (EMA; raw LoRA in non_ema/)" if ema is not None else ""))
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = create_repo(args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
            upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=args.hub_token,
                          ignore_patterns=["checkpoint-*", "*.incomplete", "logs/*"], commit_message="YOSO-LoRA")


def _prefetch_tokenized(batches, tokenize, num_workers):
    """Tokenize upcoming batches in worker threads (tokenizers release the GIL)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=num_workers)
    pending = deque()
    for _ in range(num_workers * 2):
        epoch, b, indices = next(batches)
        pending.append((epoch, b, indices, pool.submit(tokenize, indices)))
    while True:
        epoch, b, indices, future = pending.popleft()
        next_epoch, next_b, next_indices = next(batches)
        pending.append((next_epoch, next_b, next_indices, pool.submit(tokenize, next_indices)))
        yield (epoch, b, indices, *future.result())


def _dump_rank_weights_for_tests(accelerator, unet_module, discriminator_module):
    """With YOSO_DUMP_RANK_WEIGHTS=dir, every rank writes the LoRA and D it holds (multi-process tests)."""
    folder = os.environ.get("YOSO_DUMP_RANK_WEIGHTS")
    if not folder:
        return
    from safetensors.torch import save_file

    from yoso.lora import lora_named_parameters

    Path(folder).mkdir(parents=True, exist_ok=True)
    tensors = {f"lora.{n}": p.detach().cpu().contiguous() for n, p in lora_named_parameters(unet_module)}
    tensors.update({f"d.{n}": p.detach().cpu().contiguous() for n, p in discriminator_module.state_dict().items()})
    save_file(tensors, os.path.join(folder, f"rank{accelerator.process_index}.safetensors"))


if __name__ == "__main__":
    main()
