"""fp16 training (issue 3, item 6), with what accelerate gives a GPU emulated on CPU.

accelerate gives CPU no fp16; ``harness.emulate_gpu_fp16`` (in-process) and ``tests/fp16_on_cpu.py``
(around the unmodified script) install torch's CPU GradScaler and fp16 autocast instead. This checks
the logic of the fp16 path (two optimizers, loss scaling under accumulation, overflow skips, scaler
state in checkpoints), not GPU kernels.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import yoso.method.step
from harness import PROMPTS, build_trainer, launch, make_batch, tiny_train_args, write_prompts
from yoso.method.lora import lora_named_parameters

# Scale grows at every clean update, so it changes between every pair of micro-steps.
GROWING_SCALER = {"init_scale": 2.0**10, "growth_interval": 1}


def snapshot(trainer):
    tensors = {f"lora.{n}": p.detach().clone() for n, p in lora_named_parameters(trainer.unet_module)}
    tensors.update({f"d.{n}": p.detach().clone() for n, p in trainer.discriminator_module.named_parameters()})
    tensors.update({f"ema.{n}": t.clone() for n, t in trainer.ema.named_tensors().items()})
    return tensors


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run_micro_steps(trainer, models, count):
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        batch = make_batch(models, PROMPTS[:2], start_index=2 * i)
        with trainer.accelerator.accumulate(trainer.unet, trainer.discriminator):
            trainer.step(batch, generator)
    return snapshot(trainer)


def test_loss_scaling_is_exact_under_gradient_accumulation(tiny_base, tiny_teacher, monkeypatch):
    """fp32 arithmetic with loss scaling must equal no scaling (powers of two), even when the scale
    changes at every update; with one scaler shared by D and G it does not (negative control)."""
    reference_trainer, models = build_trainer(tiny_base, tiny_teacher, gradient_accumulation_steps=2)
    initial = snapshot(reference_trainer)
    reference = run_micro_steps(reference_trainer, models, 4)
    assert max_difference(reference, initial) > 1e-4  # it trained

    trainer, models = build_trainer(tiny_base, tiny_teacher, mixed_precision="fp16", gradient_accumulation_steps=2,
                                    grad_scaler=GROWING_SCALER, fp16_arithmetic=False)
    assert trainer.discriminator_scaler is not None
    assert trainer.discriminator_scaler is not trainer.accelerator.scaler
    scaled = run_micro_steps(trainer, models, 4)
    # Both scalers really moved: 2 clean updates each from 2**10.
    assert trainer.accelerator.scaler.get_scale() == trainer.discriminator_scaler.get_scale() == 2.0**12
    assert max_difference(scaled, reference) <= 1e-6

    # Negative control: the shared scaler (accelerate's default) weighs G's micro-batches 1:2.
    monkeypatch.setattr(yoso.method.step, "separate_discriminator_scaler", lambda accelerator, optimizer: None)
    shared_trainer, models = build_trainer(tiny_base, tiny_teacher, mixed_precision="fp16", gradient_accumulation_steps=2,
                                           grad_scaler=GROWING_SCALER, fp16_arithmetic=False)
    shared = run_micro_steps(shared_trainer, models, 4)
    lora_only = lambda tensors: {k: v for k, v in tensors.items() if k.startswith("lora.")}  # noqa: E731
    assert max_difference(lora_only(shared), lora_only(reference)) > 1e-4


def test_an_overflow_skips_only_the_optimizer_it_hit(tiny_base, tiny_teacher):
    trainer, models = build_trainer(tiny_base, tiny_teacher, mixed_precision="fp16",
                                    grad_scaler={"init_scale": 2.0**10}, fp16_arithmetic=False)
    g_scaler, d_scaler = trainer.accelerator.scaler, trainer.discriminator_scaler
    scheduler = trainer.lr_scheduler.scheduler
    d_param = next(trainer.discriminator_module.parameters())
    lora_param = trainer.lora_parameters[0]
    generator = torch.Generator().manual_seed(0)

    def poison(param):
        return param.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    # 1. inf in D's gradients: D keeps its weights and halves its scale; G steps as usual.
    before, epochs = snapshot(trainer), scheduler.last_epoch
    handle = poison(d_param)
    trainer.step(make_batch(models, PROMPTS[:2]), generator)
    handle.remove()
    after = snapshot(trainer)
    assert trainer.optimizer_d.step_was_skipped and not trainer.optimizer_g.step_was_skipped
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("d."))
    assert max_difference({k: v for k, v in after.items() if k.startswith("lora.")},
                          {k: v for k, v in before.items() if k.startswith("lora.")}) > 0
    assert d_scaler.get_scale() == 2.0**9 and g_scaler.get_scale() == 2.0**10
    assert scheduler.last_epoch == epochs + 1

    # 2. inf in the LoRA's gradients: the LoRA, its EMA and the lr schedule stay; D steps.
    before, epochs = after, scheduler.last_epoch
    handle = poison(lora_param)
    trainer.step(make_batch(models, PROMPTS[2:4], start_index=2), generator)
    handle.remove()
    after = snapshot(trainer)
    assert trainer.optimizer_g.step_was_skipped and not trainer.optimizer_d.step_was_skipped
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("lora.", "ema.")))
    assert max_difference({k: v for k, v in after.items() if k.startswith("d.")},
                          {k: v for k, v in before.items() if k.startswith("d.")}) > 0
    assert g_scaler.get_scale() == 2.0**9 and d_scaler.get_scale() == 2.0**9
    assert scheduler.last_epoch == epochs


def test_fp16_step_keeps_trainable_weights_fp32(tiny_base, tiny_teacher):
    trainer, models = build_trainer(tiny_base, tiny_teacher, mixed_precision="fp16", grad_scaler={})
    logs = trainer.step(make_batch(models, PROMPTS[:2]), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(logs[k]).all() for k in ("loss_con", "loss_kl", "loss_adv", "loss_d"))
    assert models.text_encoder.dtype == torch.float16 and models.vae.dtype == torch.float16
    frozen = [p for p in trainer.unet_module.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.float16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in trainer.lora_parameters)
    assert all(p.dtype == torch.float32 for p in trainer.discriminator_module.parameters())


FP16_ENV = {"FP16_ON_CPU_SCALER": json.dumps(GROWING_SCALER)}


def fp16_args(tiny_base, tiny_teacher, prompts, out, **extra):
    return tiny_train_args(tiny_base, tiny_teacher, prompts, out, steps=4, mixed_precision="fp16",
                           gradient_accumulation_steps=2, train_batch_size=2, use_ema=True, ema_decay=0.5,
                           checkpointing_steps=2, report_to="none", **extra)


@pytest.fixture(scope="module")
def fp16_run(tiny_base, tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    prompts = write_prompts(root / "prompts.jsonl")
    result = launch(fp16_args(tiny_base, tiny_teacher, prompts, root / "out", validation_prompts=["a red fox"],
                              validation_steps=4),
                    script="tests/fp16_on_cpu.py", env=FP16_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, prompts


def test_fp16_run_end_to_end(fp16_run, tiny_base):
    from diffusers import StableDiffusionPipeline

    out = fp16_run[0] / "out"
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())
    assert (out / "validation" / "step-000004.png").is_file()
    for step, scale in ((2, 2.0**12), (4, 2.0**14)):  # each scaler doubles at each clean update (one per step)
        for name in ("scaler.pt", "custom_checkpoint_3.pkl"):  # G's (accelerate's), D's (registered last)
            state = torch.load(out / f"checkpoint-{step}" / name, weights_only=False)
            assert state["scale"] == scale, (step, name, state)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, c).sample
        pipe.load_lora_weights(out)
        tuned = pipe.unet(x, t, c).sample
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 1e-4


def test_fp16_resume_matches_uninterrupted_run(fp16_run, tiny_base, tiny_teacher, tmp_path):
    root, prompts = fp16_run
    out_a, out_b = root / "out", tmp_path / "out"
    out_b.mkdir()
    shutil.copytree(out_a / "checkpoint-2", out_b / "checkpoint-2")
    result = launch(fp16_args(tiny_base, tiny_teacher, prompts, out_b, resume_from_checkpoint="latest"),
                    script="tests/fp16_on_cpu.py", env=FP16_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors",
                 "latent_stats.safetensors", "checkpoint-4/discriminator.safetensors"):
        assert max_difference(load_file(out_a / name), load_file(out_b / name)) <= 1e-6, name
    for name in ("scaler.pt", "custom_checkpoint_3.pkl"):
        assert (torch.load(out_a / "checkpoint-4" / name, weights_only=False)
                == torch.load(out_b / "checkpoint-4" / name, weights_only=False)), name


def test_fp16_two_processes_hold_identical_weights(tiny_base, tiny_teacher, tmp_path):
    """The published recipe's combination: fp16, DDP, accumulation, gradient checkpointing, EMA."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    dump = tmp_path / "dump"
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts, tmp_path / "out", steps=2, train_batch_size=2,
                                    mixed_precision="fp16", gradient_accumulation_steps=2, gradient_checkpointing=True,
                                    use_ema=True, report_to="none"),
                    num_processes=2, script="tests/fp16_on_cpu.py",
                    env=FP16_ENV, dump=dump)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Backend: gloo" in result.stderr
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_fp16_training_from_the_teacher_cache_equals_on_the_fly(tiny_base, tiny_teacher, tmp_path):
    """docs/performance.md's cache commands use fp16: fp16 teacher latents stored, then read back, train the same."""
    from harness import REPO

    prompts = write_prompts(tmp_path / "prompts.jsonl", n=16)
    cache = tmp_path / "cache"
    result = launch([REPO / "precompute_teacher_latents.py", "--pretrained_model_name_or_path", tiny_base,
                     "--pretrained_teacher_model", tiny_teacher,
                     "--train_data", prompts, "--resolution", "64", "--seed", "0", "--output_dir", cache,
                     "--train_batch_size", "4", "--mixed_precision", "fp16"],
                    script="tests/fp16_on_cpu.py", env=FP16_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["mixed_precision"] == "fp16" and info["dtype"] == "float16"

    common = dict(steps=3, mixed_precision="fp16", use_ema=True, report_to="none")
    outputs = {}
    for name, extra in (("on_the_fly", {}), ("cached", {"teacher_latent_cache": cache})):
        outputs[name] = tmp_path / name
        result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts, outputs[name], **common, **extra),
                        script="tests/fp16_on_cpu.py", env=FP16_ENV)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "the teacher is not loaded" in result.stderr
    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors",
                 "latent_stats.safetensors"):
        assert max_difference(load_file(outputs["on_the_fly"] / name), load_file(outputs["cached"] / name)) <= 1e-6
