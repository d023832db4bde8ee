"""Builds a YOSOTrainingStep in-process, the way train_yoso_lora.py does, for step-level tests."""

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def fresh_accelerator(**kwargs):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Each test may want another precision / accumulation; accelerate's state is a process singleton.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True, **kwargs)


def emulate_gpu_fp16(accelerator, fp16_arithmetic=True, **scaler_kwargs):
    """Give a CPU fp16 accelerator what accelerate gives a GPU: a GradScaler and fp16 autocast.

    With ``fp16_arithmetic=False`` the step runs in fp32 with loss scaling only: scaling by powers of
    two is then exact, so a scaled run must equal an unscaled one.
    """
    from accelerate.utils import AutocastKwargs

    assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
    if not fp16_arithmetic:  # both accelerator.autocast() and prepare()'s forward wrapper read this
        accelerator.autocast_handler = AutocastKwargs(enabled=False)
    return accelerator


def build_trainer(base, teacher, mixed_precision="no", gradient_accumulation_steps=1, gradient_checkpointing=False,
                  use_ema=True, ema_decay=0.9, lr=1e-3, lora_rank=4, teacher_steps=1, seed=0, resolution=64,
                  grad_scaler=None, fp16_arithmetic=True, **settings):
    """The run ``train_yoso_lora.py`` builds (``yoso.training.builder.build_run``), in-process on the tiny models; returns
    ``(trainer, models)``. ``settings``: further ``RunSettings`` fields (loss weights, noise offset ...).
    ``grad_scaler``: GradScaler settings to emulate GPU fp16 on CPU (``mixed_precision="fp16"``)."""
    from yoso.training.builder import RunSettings, build_run

    accelerator = fresh_accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)
    if grad_scaler is not None:
        emulate_gpu_fp16(accelerator, fp16_arithmetic, **grad_scaler)
    torch.manual_seed(seed)
    run_settings = RunSettings(
        pretrained_model_name_or_path=base, pretrained_teacher_model=teacher, resolution=resolution,
        lora_rank=lora_rank, lora_alpha=8, gradient_checkpointing=gradient_checkpointing,
        teacher_num_inference_steps=teacher_steps, use_ema=use_ema, ema_decay=ema_decay, learning_rate=lr, seed=seed,
        gradient_accumulation_steps=gradient_accumulation_steps, **settings)
    # Loss scaling without fp16 arithmetic keeps the frozen weights fp32 too.
    run = build_run(run_settings, accelerator, num_training_steps=1,
                    weight_dtype=None if fp16_arithmetic else torch.float32)
    return run.trainer, run.models


def make_batch(models, prompts, epoch=0, start_index=0):
    ids = models.tokenizer(prompts, padding="max_length", max_length=models.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    return {"prompts": prompts, "input_ids": ids, "indices": list(range(start_index, start_index + len(prompts))),
            "epoch": epoch}


PROMPTS = ["a red fox in the snow", "an old lighthouse at dusk", "a bowl of ramen", "a tiny robot"]


def write_prompts(path, prompts=None, n=48):
    import json

    prompts = prompts or [f"{PROMPTS[i % len(PROMPTS)]}, variation {i}" for i in range(n)]
    Path(path).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def launch(args, num_processes=1, env=None, timeout=600, script="train_yoso_lora.py", dump=None):
    """Run a script under ``accelerate launch`` on CPU (1 process, or several with gloo). With ``dump`` (a
    folder), the training runs through tests/rank_weights_dump.py, which writes what each rank trained."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        cmd += ["--multi_gpu"]
    program = [str(REPO / script)]
    if dump is not None:
        dumper = [str(REPO / "tests" / "rank_weights_dump.py"), str(dump)]
        program = dumper if script == "train_yoso_lora.py" else program + dumper  # e.g. fp16_on_cpu.py wraps it
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", *program] + [str(a) for a in args]
    full_env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def tiny_train_args(base, teacher, train_data, output_dir, steps=6, **extra):
    args = ["--pretrained_model_name_or_path", base, "--pretrained_teacher_model", teacher,
            "--train_data", train_data, "--resolution", "64", "--output_dir", output_dir,
            "--train_batch_size", "4", "--max_train_steps", str(steps), "--lora_rank", "4",
            "--learning_rate", "1e-3", "--seed", "0"]
    for key, value in extra.items():
        flag = "--" + key
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args
