"""Checkpoints: what they hold, and their folders.

A checkpoint is accelerate's ``save_state`` (optimizers, lr schedule, gradient scalers, RNG states and the
registered objects: counters, latent statistics, EMA, D's scaler) plus, through hooks, the LoRA in the
diffusers format and D's weights; never the frozen base weights. Folders are written under a temporary
name and renamed when complete, so ``latest`` never picks up a half-written one; pruned oldest-first to
``--checkpoints_total_limit``.
"""

import os
import re
import shutil
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_SUFFIX = ".incomplete"
DISCRIMINATOR_WEIGHT_NAME = "discriminator.safetensors"


def list_checkpoints(output_dir):
    """Complete checkpoints in ``output_dir``, oldest first, as (step, path)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir):
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def incomplete_path(output_dir, step):
    return Path(output_dir) / f"checkpoint-{step}{INCOMPLETE_SUFFIX}"


def finalize(output_dir, step):
    """Rename the finished temporary folder to ``checkpoint-<step>``; returns the final path."""
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    incomplete_path(output_dir, step).rename(final)
    return final


def prune(output_dir, total_limit):
    """Delete the oldest complete checkpoints beyond ``total_limit``; returns what was removed."""
    if not total_limit:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(len(checkpoints) - total_limit, 0)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


class TrainState:
    """Counters that a checkpoint must restore: optimizer steps, micro-steps (= batches consumed), and the
    steps whose update a non-finite loss skipped."""

    def __init__(self):
        self.global_step = 0
        self.micro_steps = 0
        self.nonfinite_steps = 0

    def state_dict(self):
        return {"global_step": self.global_step, "micro_steps": self.micro_steps, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state):
        self.global_step, self.micro_steps = int(state["global_step"]), int(state["micro_steps"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))


def register_checkpointing(run, extra):
    """Make ``accelerator.save_state`` / ``load_state`` hold ``run``'s LoRA, D and the objects in ``extra``
    (each with ``state_dict``/``load_state_dict``; None entries are skipped)."""
    from safetensors.torch import load_file, save_file

    from .lora import load_lora_into_unet, save_lora

    accelerator = run.accelerator
    # accelerate saves its own (G's) scaler as scaler.pt; D's fp16 scaler is registered here, last.
    for obj in [*extra, run.trainer.discriminator_scaler]:
        if obj is not None:
            accelerator.register_for_checkpointing(obj)

    def save_model_hook(_models, weights, folder):
        if accelerator.is_main_process:
            save_lora(run.unet_module, folder)
            save_file({k: v.detach().cpu().contiguous() for k, v in run.discriminator_module.state_dict().items()},
                      os.path.join(folder, DISCRIMINATOR_WEIGHT_NAME))
        weights.clear()  # saved above; accelerate must not write the full (860M) UNet

    def load_model_hook(prepared_models, folder):
        load_lora_into_unet(run.unet_module, folder)
        run.discriminator_module.load_state_dict(load_file(os.path.join(folder, DISCRIMINATOR_WEIGHT_NAME)))
        prepared_models.clear()  # loaded above; accelerate must not look for full model weights

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def save_checkpoint(accelerator, output_dir, step, total_limit, logger):
    """``checkpoint-<step>`` in ``output_dir``, complete or absent; older ones pruned to ``total_limit``."""
    tmp = incomplete_path(output_dir, step)
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = finalize(output_dir, step)
        for removed in prune(output_dir, total_limit):
            logger.info(f"removed old checkpoint {removed}")
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
