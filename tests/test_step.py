"""The training step in-process: UNet passes (item 4), shared eps (item 1), EMA (item 5), D isolation
(item 3), mixed precision and validation side effects (item 6), non-finite losses (item 11)."""

import copy

import pytest
import torch

from harness import PROMPTS, build_trainer, make_batch
from yoso.method.lora import lora_named_parameters
from yoso.method.step import NonFiniteLossError


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
    from yoso.training.validation import generate_validation_images

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


# ---- issue 15: the step's order, D's update in pieces, channels-last, fused AdamW, compilation --------------

@pytest.mark.parametrize("settings", [
    {"step_order": "discriminator_first", "discriminator_chunks": 4, "gan": "batch"},  # halves in pieces: D pre-pass
    {"step_order": "generator_first", "discriminator_chunks": 2, "gan": "sample"},
    # G's losses on its output in pieces: F and D per piece, the batch-mean logit from a pass without gradient
    {"generator_chunks": 2, "gan": "batch"},
    {"generator_chunks": 3, "step_order": "discriminator_first", "gan": "sample"},
    {"generator_chunks": 4, "gan": "batch", "kl_loss": "lpl", "kl_weighting": "batch"},
    {"generator_chunks": 2, "gan": "sample", "kl_loss": "lpl", "kl_weighting": "sample", "consistency_loss": "mse"},
    # one backward through F, D and G together (the order before staged backward): same losses and gradients
    {"staged_backward": False, "gan": "batch"},
    {"staged_backward": False, "step_order": "discriminator_first", "gan": "sample"},
])
def test_other_orders_match_the_golden_reference(tiny_base, monkeypatch, settings):
    """The golden step's straight-line SPEC reference (tests/test_golden_step.py, unchanged) against the step run
    in another order / with D's update in pieces: the same losses and gradients to the same 1e-5."""
    import functools

    import harness
    import test_golden_step as golden

    settings = dict(settings)
    gan = settings.pop("gan")
    losses_kwargs = {k: settings.pop(k) for k in ("kl_loss", "consistency_loss") if k in settings}
    kl_weighting = settings.pop("kl_weighting", "batch")
    monkeypatch.setattr(golden, "build_trainer", functools.partial(harness.build_trainer, **settings))
    (losses, d_grads, g_grads), _, logs, seen = golden.run_both(tiny_base, kl_weighting, gan, **losses_kwargs)
    for name, value in losses.items():
        assert abs(logs[name].item() - value.item()) <= golden.TOL * max(1.0, abs(value.item())), (name, settings)
    assert len(seen["d"]) == len(d_grads) and len(seen["g"]) == len(g_grads) > 0
    assert golden.max_difference(seen["d"], d_grads) <= golden.TOL
    assert golden.max_difference(seen["g"], g_grads) <= golden.TOL


def test_discriminator_first_passes_and_pieces(tiny_base, tiny_teacher):
    """discriminator_first: G without gradient on [x_t ; x_td ; x_tp], then with gradient on x_t; D's update in
    4 pieces (B/2 samples each) after a no-grad pass for the batch-mean logits; G's graph is not alive in D's update."""
    trainer, models = build_trainer(tiny_base, tiny_teacher, step_order="discriminator_first", discriminator_chunks=4)
    log = CallLog()
    events = []
    handles = [models.unet.register_forward_pre_hook(log.hook("G"), with_kwargs=True),
               models.discriminator.register_forward_pre_hook(log.hook("D"), with_kwargs=True)]
    inner_step = trainer.optimizer_d.step
    trainer.optimizer_d.step = lambda *a, **k: (events.append(("D step", len(log.calls))), inner_step(*a, **k))[1]
    trainer.step(make_batch(models, PROMPTS[:4]), torch.Generator().manual_seed(0))
    for h in handles:
        h.remove()
    B = 4
    assert [(n, b, g) for n, b, g in log.calls if n == "G"] == [("G", 3 * B, False), ("G", B, True)]
    d_calls = [(b, g) for n, b, g in log.calls if n == "D"]
    assert d_calls == [(B // 2, False)] * 4 + [(B // 2, True)] * 4 + [(B, True)]  # pre-pass, pieces, G's scoring
    # D's optimizer stepped before G's pass with gradient began.
    (_, calls_before_d_step), = events
    assert [n for n, _, g in log.calls[:calls_before_d_step] if n == "G" and g] == []


def run_steps(trainer, models, steps=2):
    """Losses per step, the gradients G's and D's optimizers saw at the first step, and the weights after."""
    losses, first_grads = [], []
    hooks = [opt.optimizer.register_step_pre_hook(
        lambda o, args, kwargs: first_grads.append([p.grad.clone() for g in o.param_groups for p in g["params"]])
        if len(first_grads) < 2 else None) for opt in (trainer.optimizer_d, trainer.optimizer_g)]
    for i in range(steps):
        logs = trainer.step(make_batch(models, PROMPTS[:2], start_index=2 * i), torch.Generator().manual_seed(i))
        losses.append([logs[k].item() for k in ("loss_con", "loss_kl", "loss_adv", "loss_d")])
    for hook in hooks:
        hook.remove()
    return torch.tensor(losses, dtype=torch.float64), first_grads, snapshot(trainer, models)


def assert_all_close(xs, ys, **tolerance):
    assert len(xs) == len(ys) > 0
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, **tolerance)


def test_channels_last_and_fused_adamw_train_the_same(tiny_base, tiny_teacher):
    """--channels_last (frozen conv weights and the models' inputs) changes the memory layout, not the numbers:
    the same losses and gradients to float rounding. --adam_fused on (torch's fused AdamW, here on CPU) is the
    same AdamW update: the same weights after two steps."""
    losses, grads, weights = run_steps(*build_trainer(tiny_base, tiny_teacher))

    trainer, models = build_trainer(tiny_base, tiny_teacher, channels_last=True)
    frozen_convs = [p for n, p in models.unet.named_parameters() if p.dim() == 4 and not p.requires_grad]
    assert frozen_convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in frozen_convs)
    assert all(p.is_contiguous() for _, p in lora_named_parameters(models.unet))  # safetensors saves them
    cl_losses, cl_grads, _ = run_steps(trainer, models)
    torch.testing.assert_close(cl_losses, losses, atol=1e-6, rtol=1e-5)
    for cl, plain in zip(cl_grads, grads):  # D's, then G's
        assert_all_close(cl, plain, atol=1e-6, rtol=1e-4)

    trainer, models = build_trainer(tiny_base, tiny_teacher, adam_fused="on")
    for optimizer in (trainer.optimizer_g, trainer.optimizer_d):
        assert all(group["fused"] for group in optimizer.optimizer.param_groups)
    fused_losses, _, _ = run_steps(trainer, models)
    torch.testing.assert_close(fused_losses, losses, atol=1e-6, rtol=1e-5)
    # The update itself, on the step's own gradients (weights after training are not a fair comparison: Adam's
    # g / sqrt(v) turns any rounding in gradients near 1e-10, e.g. from D's updated weights, into lr-sized steps).
    for betas, step_grads in (((0.0, 0.999), grads[0]), ((0.9, 0.999), grads[1])):  # D's, G's
        updated = {}
        for fused in (False, True):
            params = [torch.nn.Parameter(torch.zeros_like(g)) for g in step_grads]
            adamw = torch.optim.AdamW(params, lr=1e-3, betas=betas, weight_decay=1e-2, eps=1e-8, fused=fused)
            for k in range(3):
                for p, g in zip(params, step_grads):
                    p.grad = g * (k + 1)
                adamw.step()
            updated[fused] = [p.detach() for p in params]
        assert_all_close(updated[True], updated[False], atol=1e-9, rtol=1e-6)


def test_fused_adamw_under_fp16_skips_like_the_unfused_one(tiny_base, tiny_teacher):
    """A fused AdamW skips an overflowing fp16 step inside its kernel, where accelerate cannot see it: the step
    must still skip the lr schedule and the EMA, as it does with the unfused AdamW (GPU fp16 emulated on CPU)."""
    results = {}
    for fused in ("off", "on"):
        trainer, models = build_trainer(tiny_base, tiny_teacher, mixed_precision="fp16", fp16_arithmetic=False,
                                        grad_scaler={"init_scale": 2.0**127}, adam_fused=fused,
                                        lr_scheduler="linear", lr_warmup_steps=0)
        lora = [p for _, p in lora_named_parameters(models.unet)]
        lr_before, lora_before = trainer.lr_scheduler.get_last_lr()[0], [p.detach().clone() for p in lora]
        # An overflow in the scaled gradients (the losses stay finite): a loss scale near float32's limit.
        scaler = trainer.accelerator.scaler
        trainer.step(make_batch(models, PROMPTS[:2]), torch.Generator().manual_seed(0))
        results[fused] = (scaler.get_scale(), trainer.lr_scheduler.get_last_lr()[0] == lr_before,
                          trainer.ema.num_updates, all(torch.equal(p, q) for p, q in zip(lora, lora_before)))
    assert results["off"] == results["on"] == (2.0**126, True, 0, True)


def test_torch_compile_trains_the_same(tiny_base, tiny_teacher, monkeypatch):
    """--torch_compile compiles every resnet and transformer block of G (hence F) and D in place, the LoRA layers
    inside them included, without renaming any parameter. Then two steps with the transformer blocks compiled give
    the same losses and gradients as eager: the LoRA layers trace, and the graphs are guarded on what changes
    between passes (gradient on/off, the LoRA off in F, D's weights trainable or frozen).

    Time budget: dynamo captures the graphs (backend "eager": no AOTAutograd, no code generation) of the
    transformer blocks only, 12 graphs in about 25 s of CPU; all blocks make 34 graphs and with AOTAutograd
    they took 260 s of CPU here. The GPU call compiles every block with inductor, with and without checkpointing."""
    import torch._dynamo.utils

    import yoso.training.builder

    trainer, models = build_trainer(tiny_base, tiny_teacher, torch_compile=True)  # built, not stepped
    compiled = [m for m in list(models.unet.modules()) + list(models.discriminator.modules())
                if getattr(m, "_compiled_call_impl", None) is not None]
    assert sorted({type(m).__name__ for m in compiled}) == ["BasicTransformerBlock", "ResnetBlock2D"]
    assert len(compiled) == 18  # G: 8 resnets and 4 transformer blocks; D's encoder: 4 and 2
    assert any("lora_" in n for m in compiled for n, _ in m.named_parameters())
    assert not any("_orig_mod" in name for name in models.unet.state_dict())  # checkpoints and LoRAs unchanged

    losses, grads, _ = run_steps(*build_trainer(tiny_base, tiny_teacher))
    monkeypatch.setattr(yoso.training.builder, "COMPILED_BLOCKS", ("BasicTransformerBlock",))
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    trainer, models = build_trainer(tiny_base, tiny_teacher, torch_compile=True, torch_compile_backend="eager")
    compiled_losses, compiled_grads, _ = run_steps(trainer, models)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # it did compile
    torch.testing.assert_close(compiled_losses, losses, atol=1e-6, rtol=1e-5)
    for compiled_step, eager_step in zip(compiled_grads, grads):
        assert_all_close(compiled_step, eager_step, atol=1e-6, rtol=1e-4)


def test_speed_flags_reach_the_run_and_bad_values_are_refused(capsys, monkeypatch):
    """train_yoso_lora.py's flags of issue 15 land in RunSettings by name; bad values stop with one line, exit 2."""
    import train_yoso_lora
    from yoso.training.checks import ArgumentError, check_optional_packages
    from yoso.training.builder import RunSettings, fused_adamw

    args = train_yoso_lora.parse_args(["--step_order", "discriminator_first", "--discriminator_chunks", "4",
                                       "--torch_compile", "--channels_last", "--adam_fused", "off"])
    settings = RunSettings.from_args(args)
    assert (settings.step_order, settings.discriminator_chunks, settings.torch_compile, settings.channels_last,
            settings.adam_fused) == ("discriminator_first", 4, True, True, "off")
    defaults = RunSettings.from_args(train_yoso_lora.parse_args([]))
    assert (defaults.step_order, defaults.discriminator_chunks, defaults.torch_compile, defaults.channels_last,
            defaults.adam_fused) == ("generator_first", 1, False, False, "auto")
    assert fused_adamw("auto", "cuda") and not fused_adamw("auto", "cpu") and fused_adamw("on", "cpu")
    assert not fused_adamw("auto", "cuda", use_8bit_adam=True)
    for bad in (["--discriminator_chunks", "3"], ["--discriminator_chunks", "0"], ["--step_order", "backwards"]):
        with pytest.raises(SystemExit) as exit_info:
            train_yoso_lora.parse_args(bad)
        assert exit_info.value.code == 2
        assert bad[0] in capsys.readouterr().err
    import yoso.training.checks

    real_find_spec = yoso.training.checks.importlib.util.find_spec
    monkeypatch.setattr(yoso.training.checks.importlib.util, "find_spec",  # as if bitsandbytes were installed
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    check_optional_packages(train_yoso_lora.parse_args(["--use_8bit_adam"]))  # fine alone
    with pytest.raises(ArgumentError, match="--adam_fused on: .*--use_8bit_adam"):
        check_optional_packages(train_yoso_lora.parse_args(["--adam_fused", "on", "--use_8bit_adam"]))


def test_two_processes_with_discriminator_first_in_pieces_stay_identical(tiny_base, tiny_teacher, tmp_path):
    """Under DDP (2 CPU processes, gloo) D's update in pieces exchanges gradients once, after the last piece
    (the others under no_sync): every rank must still hold the same LoRA and D after training."""
    from safetensors.torch import load_file

    from harness import launch, tiny_train_args, write_prompts

    prompts = write_prompts(tmp_path / "prompts.jsonl", n=16)
    dump = tmp_path / "dump"
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts, tmp_path / "out", steps=2, train_batch_size=2,
                                    step_order="discriminator_first", discriminator_chunks=2, report_to="none",
                                    checkpointing_steps=100),
                    num_processes=2, dump=dump)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and any(k.startswith("d.") for k in rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
