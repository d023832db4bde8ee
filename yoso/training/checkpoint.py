"""Checkpoints: what they hold, and their folders.

A checkpoint is accelerate's ``save_state`` (optimizers, lr schedule, gradient scalers, RNG states and the
registered objects: counters, latent statistics, EMA, D's scaler) plus, through hooks, the LoRA in the
diffusers format and D's weights; never the frozen base weights. Folders are written under a temporary
name and renamed when complete, so ``latest`` never picks up a half-written one; pruned oldest-first to
``--checkpoints_total_limit``.

Each checkpoint also holds ``yoso_run_settings.json``: the settings it cannot be resumed without
(``RESUME_FIXED_SETTINGS``, the base UNet's architecture, whether it holds fp16 gradient scalers), so
that a resume with other values is refused in one line before any model loads, instead of failing
deep inside ``load_state`` (or, for the LoRA's alpha, silently training another model).
"""

import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_SUFFIX = ".incomplete"
DISCRIMINATOR_WEIGHT_NAME = "discriminator.safetensors"
RUN_SETTINGS_NAME = "yoso_run_settings.json"
RUN_SETTINGS_FORMAT = 1

# Flag -> why a resumed run must keep it. Everything else (learning rates, steps, batch size, loss weights,
# logging, validation, the teacher) may change on resume.
RESUME_FIXED_SETTINGS = {
    "resolution": "it sizes the latent statistics and the discriminator's pooling",
    "lora_rank": "it sizes the LoRA's tensors",
    "lora_alpha": "it is the LoRA's scale: the saved weights mean another model under another alpha",
    "lora_target_modules": "it says which modules hold a LoRA",
    "use_ema": "the EMA is part of the saved state",
    "use_8bit_adam": "it sets the optimizer state's format",
}


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


def resolve_checkpoint(value, output_dir):
    """The folder ``--resume_from_checkpoint`` names: for ``latest`` the newest complete checkpoint in
    ``output_dir`` (None when there is none yet); else ``value`` itself when it exists, else the folder of
    that name inside ``output_dir`` (diffusers' scripts' rule). Returns ``(path or None, tried)``: the
    places looked at, for the error message when nothing is found."""
    if value == "latest":
        return latest_checkpoint(output_dir), []
    tried = [Path(value).expanduser(), Path(output_dir) / value]
    for path in tried:
        if path.is_dir():
            return path, tried
    return None, tried


def _comparable(name, value):
    if name == "lora_target_modules":
        return sorted(set(value))
    if name == "lora_alpha":
        return float(value)
    return value


def unet_architecture(unet_config):
    """A UNet config as JSON values, without diffusers' bookkeeping (``_class_name``, ``_name_or_path`` ...)."""
    return json.loads(json.dumps({k: v for k, v in dict(unet_config).items() if not k.startswith("_")}))


def run_settings_record(settings, unet_config, mixed_precision, grad_scalers):
    """What ``yoso_run_settings.json`` holds, from a ``yoso.training.builder.RunSettings``."""
    return {
        "format": RUN_SETTINGS_FORMAT,
        "settings": {name: _comparable(name, getattr(settings, name)) for name in RESUME_FIXED_SETTINGS},
        "pretrained_model_name_or_path": str(settings.pretrained_model_name_or_path),
        "base_unet": unet_architecture(unet_config),
        "mixed_precision": mixed_precision,
        "grad_scalers": bool(grad_scalers),
    }


def read_run_settings(checkpoint):
    """The checkpoint's ``yoso_run_settings.json`` as a dict, or None (a checkpoint made before it existed)."""
    path = Path(checkpoint) / RUN_SETTINGS_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _show(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def resume_conflicts(record, where, given, base_unet_config=None, base_name=None, mixed_precision=None):
    """One-line messages, one per setting of this run that ``record`` (the settings of checkpoint ``where``)
    cannot be resumed with. ``given``: the run's values by flag name (``RESUME_FIXED_SETTINGS``);
    ``base_unet_config``: the run's base UNet config (None: not compared)."""
    conflicts = []
    for name, why in RESUME_FIXED_SETTINGS.items():
        saved, now = record["settings"].get(name), _comparable(name, given[name])
        if saved is not None and saved != now:
            conflicts.append(f"--{name} {_show(now)}: {where} was trained with {_show(saved)} ({why}); resume with "
                             f"--{name} {_show(saved)}, or start a new run in another --output_dir")
    saved_unet = record.get("base_unet")
    if base_unet_config is not None and saved_unet is not None:
        now_unet = unet_architecture(base_unet_config)
        keys = sorted(k for k in set(saved_unet) | set(now_unet) if saved_unet.get(k) != now_unet.get(k))
        if keys:
            conflicts.append(
                f"--pretrained_model_name_or_path {base_name}: its UNet is not the one {where} was trained on "
                f"({record.get('pretrained_model_name_or_path')}): {keys[0]} {_show(saved_unet.get(keys[0]))} there, "
                f"{_show(now_unet.get(keys[0]))} here ({len(keys)} config values differ); resume with that base")
    if mixed_precision == "fp16" and not record.get("grad_scalers", True):
        saved_precision = record.get("mixed_precision")
        conflicts.append(f"--mixed_precision fp16: {where} was saved without fp16 gradient scalers (mixed precision "
                         f"{saved_precision}); resume with --mixed_precision {saved_precision}, or start a new run "
                         "in another --output_dir")
    return conflicts


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

    from yoso.method.lora import load_lora_into_unet, save_lora

    accelerator = run.accelerator
    # accelerate saves its own (G's) scaler as scaler.pt; D's fp16 scaler is registered here, last.
    for obj in [*extra, run.trainer.discriminator_scaler]:
        if obj is not None:
            accelerator.register_for_checkpointing(obj)

    def save_model_hook(_models, weights, folder):
        if accelerator.is_main_process:
            record = run_settings_record(run.settings, run.unet_module.config, accelerator.mixed_precision,
                                         accelerator.scaler is not None)
            Path(folder, RUN_SETTINGS_NAME).write_text(json.dumps(record, indent=2) + "\n")
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
    from yoso.training.interrupt import DiskFullError, is_disk_full

    tmp = incomplete_path(output_dir, step)
    try:
        accelerator.save_state(str(tmp))
    except BaseException as error:  # a full disk, a second Ctrl-C, ...: no half-written folder stays behind
        full = DiskFullError(Path(output_dir) / f"checkpoint-{step}") if is_disk_full(error) else None  # free space now
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from error
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from yoso.utils.atomic import follow_umask

        follow_umask(tmp)  # safetensors writes 0600
        final = finalize(output_dir, step)
        for removed in prune(output_dir, total_limit):
            logger.info(f"removed old checkpoint {removed}")
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
