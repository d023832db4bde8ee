"""The training step in-process: UNet passes (item 4), shared eps (item 1), EMA (item 5), D isolation
(item 3), mixed precision and validation side effects (item 6), non-finite losses (item 11)."""

import copy

import pytest
import torch

from harness import PROMPTS, build_trainer, make_batch
from yoso.lora import lora_named_parameters
from yoso.step import NonFiniteLossError


class CallLog:
    def __init__(self):
        self.calls = []

    def hook(self, name):
        def record(module, args, kwargs):
            sample = args[0] if args else next(iter(kwargs.values()))
            self.calls.append((name, sample.shape[0], torch.is_grad_enabled()))
        return record

    def count(self, name, grad=None):
        return sum(1 for n, _, g in self.calls if n == name and (grad is None or g == grad))

    def batch_sizes(self, name):
        return [b for n, b, _ in self.calls if n == name]


@pytest.mark.parametrize("teacher_steps,consistency_loss,kl_loss", [(1, "lpl", "mse"), (2, "lpl", "mse"),
                                                                    (1, "mse", "mse"), (1, "lpl", "lpl"), (1, "mse", "lpl")])
def test_unet_passes_per_step(tiny_base, tiny_teacher, teacher_steps, consistency_loss, kl_loss):
    trainer, models = build_trainer(tiny_base, tiny_teacher, teacher_steps=teacher_steps,
                                    consistency_loss=consistency_loss, kl_loss=kl_loss)
    log = CallLog()
    handles = [
        models.latent_source.pipeline.unet.register_forward_pre_hook(log.hook("teacher"), with_kwargs=True),
        models.unet.register_forward_pre_hook(log.hook("G"), with_kwargs=True),
        models.unet.mid_block.register_forward_pre_hook(log.hook("mid_block"), with_kwargs=True),
        models.discriminator.register_forward_pre_hook(log.hook("D"), with_kwargs=True),
    ]
    feature_net = trainer.feature_net
    trainer.feature_net = lambda z, c: (log.calls.append(("F", z.shape[0], torch.is_grad_enabled())), feature_net(z, c))[1]
    trainer.step(make_batch(models, PROMPTS[:2]), torch.Generator().manual_seed(0))
    for h in handles:
        h.remove()
    B = 2
    assert log.count("teacher") == teacher_steps and log.batch_sizes("teacher") == [B] * teacher_steps
    assert log.count("G", grad=True) == 1 and log.count("G", grad=False) == 1
    assert log.batch_sizes("G") == [B, 2 * B]  # x_t with grad; [x_td ; x_tp] without
    # F: pred with a graph; its targets (the consistency target, x0 for --kl_loss lpl) in one pass without.
    targets = (consistency_loss == "lpl") + (kl_loss == "lpl")
    expected_f = [(B, True), (targets * B, False)] if targets else []
    assert [(b, g) for n, b, g in log.calls if n == "F"] == expected_f
    assert log.batch_sizes("D") == [2 * B, B]  # [real ; fake] in D's update, pred in G's
    # F runs G's encoder half, not a UNet forward: mid-block runs for G, G and F only.
    assert log.count("mid_block") == 2 + len(expected_f)


def test_one_eps_for_all_noisings(tiny_base, tiny_teacher):
    trainer, models = build_trainer(tiny_base, tiny_teacher)
    seen = []
    handle = models.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].detach().clone(), args[1].clone())), with_kwargs=True)
    logs = trainer.step(make_batch(models, PROMPTS[:3]), torch.Generator().manual_seed(1))
    handle.remove()
    x0 = logs["x0"]
    (x_t, t), (x_pair, t_pair) = seen
    x_td, x_tp = x_pair.chunk(2)
    t_d, t_p = t_pair.chunk(2)
    assert torch.equal(t_d, (t - 250).clamp(min=0)) and torch.equal(t_p, (t - 25).clamp(min=0))
    s = trainer.schedule
    eps = [(x - s.alpha(tt, x0) * x0) / s.sigma(tt, x0) for x, tt in ((x_t, t), (x_td, t_d), (x_tp, t_p))]
    for i in range(3):
        if t_d[i] > 0:  # at t = 0 there is no noise to recover
            torch.testing.assert_close(eps[1][i], eps[0][i], atol=5e-4, rtol=1e-3)
        if t_p[i] > 0:
            torch.testing.assert_close(eps[2][i], eps[0][i], atol=5e-4, rtol=1e-3)


def test_ema_in_place_after_each_optimizer_step_fp32_no_deepcopy(tiny_base, tiny_teacher, monkeypatch):
    decay = 0.8
    trainer, models = build_trainer(tiny_base, tiny_teacher, gradient_accumulation_steps=2, ema_decay=decay)
    ema = trainer.ema
    pointers = [s.data_ptr() for s in ema.shadow]
    expected = [s.clone().double() for s in ema.shadow]
    lora = [p for _, p in lora_named_parameters(models.unet)]

    def no_deepcopy(*args, **kwargs):
        raise AssertionError("deepcopy on the training path")
    monkeypatch.setattr(copy, "deepcopy", no_deepcopy)

    for micro in range(4):
        with trainer.accelerator.accumulate(trainer.unet, trainer.discriminator):
            trainer.step(make_batch(models, PROMPTS[:2], start_index=2 * micro), torch.Generator().manual_seed(micro))
        if micro % 2 == 1:  # an optimizer step happened
            expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, lora)]
        assert ema.num_updates == (micro + 1) // 2
    assert [s.data_ptr() for s in ema.shadow] == pointers
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s.double(), e, atol=1e-7, rtol=1e-6)
    assert max((s - p.detach()).abs().max().item() for s, p in zip(ema.shadow, lora)) > 0  # EMA lags the LoRA


def test_only_discriminator_optimizer_changes_discriminator(tiny_base, tiny_teacher):
    trainer, models = build_trainer(tiny_base, tiny_teacher)
    d = models.discriminator
    before = {k: v.clone() for k, v in d.state_dict().items()}
    after_d_step = {}
    inner_step = trainer.optimizer_d.step

    def recording_step(*args, **kwargs):
        result = inner_step(*args, **kwargs)
        after_d_step.update({k: v.clone() for k, v in d.state_dict().items()})
        return result
    trainer.optimizer_d.step = recording_step
    g_param_ids = {id(p) for group in trainer.optimizer_g.param_groups for p in group["params"]}
    assert not g_param_ids & {id(p) for p in d.parameters()}

    trainer.step(make_batch(models, PROMPTS[:2]), torch.Generator().manual_seed(0))
    changed = [k for k in before if not torch.equal(before[k], after_d_step[k])]
    assert len(changed) > 0.5 * len(before)  # D's optimizer did change D
    for k, v in d.state_dict().items():  # the generator's update did not
        assert torch.equal(v, after_d_step[k]), k
    assert all(p.grad is None for p in d.parameters())
    assert all(p.requires_grad for p in d.parameters())  # unfrozen again after G's pass


def test_bf16_mixed_precision_dtypes_and_validation_has_no_side_effects(tiny_base, tiny_teacher):
    from yoso.validation import generate_validation_images

    trainer, models = build_trainer(tiny_base, tiny_teacher, mixed_precision="bf16")
    frozen = {"unet base": [p for n, p in models.unet.named_parameters() if "lora_" not in n],
              "text encoder": list(models.text_encoder.parameters()), "vae": list(models.vae.parameters()),
              "teacher unet": list(models.latent_source.pipeline.unet.parameters())}
    for name, params in frozen.items():
        assert all(p.dtype == torch.bfloat16 for p in params), name
    lora = [p for _, p in lora_named_parameters(models.unet)]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(p.dtype == torch.float32 for p in models.discriminator.parameters())

    logs = trainer.step(make_batch(models, PROMPTS[:2]), torch.Generator().manual_seed(0))
    assert logs["nonfinite"] is None
    assert all(torch.isfinite(v).all() for k, v in logs.items() if k not in ("x0", "grad_norm", "nonfinite"))
    assert all(p.dtype == torch.float32 for p in lora)  # the optimizer step kept fp32

    snapshot = [p.detach().clone() for p in lora]
    ema_snapshot = [s.clone() for s in trainer.ema.shadow]
    rng_state = torch.get_rng_state()
    columns, images = generate_validation_images(
        models.unet, models.vae, models.text_encoder, models.tokenizer, models.noise_scheduler.config,
        ["a cat", "a dog"], seed=0, resolution=64, device="cpu", autocast=trainer.accelerator.autocast, ema=trainer.ema)
    assert columns == ["lora 1-step", "lora 2-step", "ema 1-step", "ema 2-step"] and len(images) == 8
    assert images[0].size == (64, 64)
    assert all(p.dtype == torch.float32 for p in lora)
    assert all(torch.equal(p, s) for p, s in zip(lora, snapshot))
    assert all(torch.equal(p, s) for p, s in zip(trainer.ema.shadow, ema_snapshot))
    assert torch.equal(torch.get_rng_state(), rng_state)
    # EMA images come from other weights than the live LoRA's.
    import numpy as np
    assert np.abs(np.asarray(images[0], dtype=float) - np.asarray(images[2], dtype=float)).max() > 0


def snapshot(trainer, models):
    return ([p.detach().clone() for _, p in lora_named_parameters(models.unet)],
            [p.detach().clone() for p in models.discriminator.parameters()], [s.clone() for s in trainer.ema.shadow])


def unchanged(before, after):
    return [all(torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(before, after)]


def test_non_finite_loss_is_skipped_and_training_goes_on(tiny_base, tiny_teacher):
    trainer, models = build_trainer(tiny_base, tiny_teacher, gradient_accumulation_steps=2)
    accelerator = trainer.accelerator

    def micro_step(i, poisoned=False):
        batch = make_batch(models, PROMPTS[:2], start_index=2 * i)
        if poisoned:
            batch["latents"] = torch.full((2, 4, 8, 8), float("inf"))
        with accelerator.accumulate(trainer.unet, trainer.discriminator):
            return trainer.step(batch, torch.Generator().manual_seed(i))

    # An inf in the first micro-step of a window skips the whole window's D and G updates, and the EMA's.
    before = snapshot(trainer, models)
    assert micro_step(0, poisoned=True)["nonfinite"] is None  # decided at the window's end
    logs = micro_step(1)
    assert "discriminator and generator loss not finite" in logs["nonfinite"] and logs["grad_norm"] is None
    assert unchanged(before, snapshot(trainer, models)) == [True, True, True]
    assert trainer.ema.num_updates == 0 and trainer.consecutive_nonfinite == 1
    # The next window trains as usual, from a clean slate (no inf gradient left over), to finite weights.
    for i in (2, 3):
        logs = micro_step(i)
    assert logs["nonfinite"] is None and trainer.consecutive_nonfinite == 0 and trainer.ema.num_updates == 1
    after = snapshot(trainer, models)
    assert unchanged(before, after) == [False, False, False]
    assert all(torch.isfinite(t).all() for group in after for t in group)


def test_consecutive_non_finite_losses_stop_the_run(tiny_base, tiny_teacher):
    trainer, models = build_trainer(tiny_base, tiny_teacher, max_nonfinite_steps=3)
    batch = make_batch(models, PROMPTS[:2])
    batch["latents"] = torch.full((2, 4, 8, 8), float("nan"))
    before = snapshot(trainer, models)
    for i in range(2):
        assert "not finite" in trainer.step(batch, torch.Generator().manual_seed(i))["nonfinite"]
    with pytest.raises(NonFiniteLossError, match="not finite for 3 consecutive steps"):
        trainer.step(batch, torch.Generator().manual_seed(2))
    assert unchanged(before, snapshot(trainer, models)) == [True, True, True]
