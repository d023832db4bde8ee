"""Training-health signals (yoso/method/health.py) and the EMA warm-up (yoso/method/ema.py): the detector on made-up
sequences, each signal against a hand computation, the warm-up decays against diffusers' formula, and a tiny
run whose discriminator is made to win outright, seen in its output and in its tensorboard log."""

import math

import pytest
import torch

from yoso.method.ema import LoRAEMA
from yoso.method.health import COLLAPSE_TOLERANCE, WIN_ACCURACY, HealthMonitor, discriminator_accuracy, ema_distance, gradient_norm


def feed(monitor, accuracies, adv=None):
    adv = adv or [1.0] * len(accuracies)
    return [monitor.observe(step, {"d_accuracy": a, "loss_adv": l})
            for step, (a, l) in enumerate(zip(accuracies, adv), start=1)]


def test_win_warns_after_window_consecutive_steps_once_per_episode():
    monitor = HealthMonitor(3)
    out = feed(monitor, [1.0, 1.0, 0.9, 1.0, 0.995, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0])
    warned = [step for step, line in enumerate(out, start=1) if line]
    # 0.9 at step 3 breaks the first run; 4-6 is the first episode (warned at 6, not again at 7, 8); 10-12 the next.
    assert warned == [6, 12]
    assert "wins outright" in out[5] and "from 4 to 6" in out[5] and "\n" not in out[5]
    assert monitor.warnings == [(6, "win"), (12, "win")]


def test_win_needs_every_step_of_the_window_at_the_bound():
    monitor = HealthMonitor(2)
    assert feed(monitor, [WIN_ACCURACY, WIN_ACCURACY - 1e-6, WIN_ACCURACY - 1e-6]) == [None, None, None]
    assert feed(HealthMonitor(2), [WIN_ACCURACY, WIN_ACCURACY])[1] is not None


def test_collapse_needs_chance_accuracy_and_a_falling_adversarial_loss():
    falling = [3.0, 2.5, 2.6, 2.0]  # least-squares slope -0.31
    rising = list(reversed(falling))
    at_chance = [0.5, 0.55, 0.45, 0.52]  # mean 0.505
    assert feed(HealthMonitor(4), at_chance, falling)[-1] is not None
    assert "collapsed" in feed(HealthMonitor(4), at_chance, falling)[-1]
    assert feed(HealthMonitor(4), at_chance, rising) == [None] * 4
    off = [0.5 + COLLAPSE_TOLERANCE + 0.01] * 4  # mean just outside the tolerance
    assert feed(HealthMonitor(4), off, falling) == [None] * 4
    assert feed(HealthMonitor(4), at_chance[:3], falling[:3]) == [None] * 3  # fewer steps than the window


def test_window_zero_disables_and_non_finite_steps_are_not_counted():
    assert feed(HealthMonitor(0), [1.0] * 10) == [None] * 10
    monitor = HealthMonitor(2)
    assert monitor.observe(1, {"d_accuracy": 1.0, "loss_adv": float("nan")}) is None
    assert monitor.observe(2, {"d_accuracy": 1.0, "loss_adv": 1.0}) is None  # only one counted step so far
    assert monitor.observe(3, {"d_accuracy": 1.0, "loss_adv": 1.0}) is not None
    with pytest.raises(ValueError):
        HealthMonitor(-1)


def test_discriminator_accuracy_counts_real_above_and_fake_below_zero():
    real = torch.tensor([0.3, -0.1, 2.0, 0.0])  # 2 of 4 above 0 (0 is not above)
    fake = torch.tensor([-1.0, -0.2, 0.5, -3.0])  # 3 of 4 below 0
    acc, acc_real, acc_fake = discriminator_accuracy(real, fake)
    assert (acc_real.item(), acc_fake.item(), acc.item()) == (0.5, 0.75, 0.625)


def test_gradient_norm_is_the_l2_norm_of_all_gradients_and_divides_out_a_scale():
    a, b, c = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 12.0])  # c has no gradient
    assert gradient_norm([a, b, c]).item() == pytest.approx(13.0)

    class Scaler:
        _scale = torch.tensor([1024.0])

    a.grad, b.grad = a.grad * 1024, b.grad * 1024
    assert gradient_norm([a, b, c], Scaler()).item() == pytest.approx(13.0)


def test_ema_distance_is_relative_to_the_lora():
    p = [torch.nn.Parameter(torch.tensor([3.0, 4.0])), torch.nn.Parameter(torch.tensor([0.0]))]
    ema = LoRAEMA([("a", p[0]), ("b", p[1])], decay=0.5)
    assert ema_distance(ema).item() == 0.0
    ema.shadow[0].copy_(torch.tensor([3.0, 1.0]))  # |diff| = 3, |lora| = 5
    ema.shadow[1].fill_(4.0)  # |diff| = sqrt(9 + 16) = 5
    assert ema_distance(ema).item() == pytest.approx(1.0)
    assert ema_distance(None) is None


# ---- EMA warm-up ---------------------------------------------------------------------------------------


def diffusers_decay(optimization_step, decay, inv_gamma, power):
    """diffusers' EMAModel.get_decay with use_ema_warmup=True, update_after_step=0, min_decay=0, written out."""
    step = max(0, optimization_step - 1)
    if step <= 0:
        return 0.0
    return max(min(1 - (1 + step / inv_gamma) ** -power, decay), 0.0)


@pytest.mark.parametrize("decay,inv_gamma,power", [(0.99, 1.0, 2 / 3), (0.999, 5.0, 0.75), (0.9, 0.5, 1.0)])
def test_ema_warmup_decays_follow_the_formula_and_update_the_average(decay, inv_gamma, power):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    ema = LoRAEMA([("p", p)], decay=decay, warmup=True, inv_gamma=inv_gamma, power=power)
    expected = p.detach().clone().double()
    for k in range(1, 301):
        with torch.no_grad():
            p.add_(torch.randn(5))
        d = diffusers_decay(k, decay, inv_gamma, power)
        assert ema.decay_at(k) == pytest.approx(d, abs=1e-15)
        ema.update()
        assert ema.last_decay == pytest.approx(d, abs=1e-15)
        expected = d * expected + (1 - d) * p.detach().double()
    assert ema.decay_at(1) == 0.0 and ema.num_updates == 300
    assert torch.allclose(ema.shadow[0].double(), expected, atol=1e-5)
    # 1 - (1 + 9)^(-2/3) = 0.78456... for the 10th update with diffusers' defaults.
    assert LoRAEMA([("p", p)], 0.999, warmup=True).decay_at(10) == pytest.approx(1 - 10 ** (-2 / 3))


def test_ema_without_warmup_keeps_the_released_constant_decay():
    p = torch.nn.Parameter(torch.ones(3))
    ema = LoRAEMA([("p", p)], decay=0.9)
    assert [ema.decay_at(k) for k in (1, 2, 1000)] == [0.9, 0.9, 0.9]
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1.1))


def test_ema_warmup_resumes_exactly_from_its_state_dict():
    torch.manual_seed(1)
    updates = [torch.randn(4) for _ in range(12)]

    def run(params, ema, steps):
        for u in steps:
            with torch.no_grad():
                params.copy_(u)
            ema.update()

    p = torch.nn.Parameter(torch.zeros(4))
    whole = LoRAEMA([("p", p)], 0.99, warmup=True, inv_gamma=2.0, power=0.75)
    run(p, whole, updates)

    q = torch.nn.Parameter(torch.zeros(4))
    first = LoRAEMA([("p", q)], 0.99, warmup=True, inv_gamma=2.0, power=0.75)
    run(q, first, updates[:5])
    state = first.state_dict()
    r = torch.nn.Parameter(torch.zeros(4))
    resumed = LoRAEMA([("p", r)], 0.99, warmup=True, inv_gamma=2.0, power=0.75)
    resumed.load_state_dict(state)
    run(r, resumed, updates[5:])
    assert resumed.num_updates == 12 and torch.equal(resumed.shadow[0], whole.shadow[0])
    assert resumed.last_decay == whole.last_decay == pytest.approx(min(0.99, 1 - (1 + 11 / 2.0) ** -0.75))


def test_parser_refuses_bad_health_and_ema_flags(capsys):
    from train_yoso_lora import parse_args

    base = ["--pretrained_model_name_or_path", "x", "--train_data", "p.jsonl", "--max_train_steps", "1"]
    for extra, needle in ((["--health_window", "-1"], "--health_window -1"), (["--ema_warmup"], "--ema_warmup"),
                          (["--use_ema", "--ema_inv_gamma", "0"], "--ema_inv_gamma 0")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(base + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    args = parse_args(base)
    assert (args.ema_warmup, args.ema_inv_gamma, args.ema_power, args.health_window) == (False, 1.0, 2 / 3, 50)
    assert (args.lr_scheduler, args.discriminator_learning_rate) == ("constant", None)


# ---- a tiny run whose discriminator wins outright ------------------------------------------------------


def test_a_discriminator_that_wins_outright_is_warned_about_and_every_signal_is_logged(tiny_base, tiny_teacher, tmp_path,
                                                                                       monkeypatch, caplog):
    """The tiny D cannot learn to tell G's two denoisings apart within a test's budget (tried: D lr 5e-4 to 5e-2,
    G lr 0, 30 steps: accuracy stays ~0.5), so D is made to win by construction: its logits get +20 on the real
    half of its update batch [real ; fake] and -20 on the fake half and on G's output (its own graph is kept, so it
    still trains). Accuracy is then 1.0 at every step and, with --health_window 3, the warning comes once, at step 3;
    the tensorboard log holds every health scalar, finite, at every step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train_yoso_lora
    from harness import fresh_accelerator, tiny_train_args, write_prompts
    from yoso.method.discriminator import Discriminator

    original = Discriminator.forward

    def winning_forward(self, x, timestep, encoder_hidden_states):
        logits = original(self, x, timestep, encoder_hidden_states)
        if x.shape[0] == 2 * BATCH:  # D's update: [real ; fake]
            return logits + torch.cat([torch.full((BATCH,), 20.0), torch.full((BATCH,), -20.0)])
        return logits - 20.0  # G's output, scored in G's update

    BATCH = 4
    monkeypatch.setattr(Discriminator, "forward", winning_forward)
    fresh_accelerator()
    steps = 5
    args = tiny_train_args(tiny_base, tiny_teacher, write_prompts(tmp_path / "p.jsonl"), tmp_path / "out", steps=steps,
                           train_batch_size=BATCH, use_ema=True, ema_warmup=True, health_window=3, report_to="tensorboard",
                           checkpointing_steps=1000)
    with caplog.at_level("WARNING"):
        train_yoso_lora.main([str(a) for a in args])
    lines = [r.getMessage() for r in caplog.records if "training health" in r.getMessage()]
    assert len(lines) == 1 and "wins outright" in lines[0] and "from 1 to 3" in lines[0], lines

    (events,) = (tmp_path / "out" / "logs" / "yoso-lora").glob("events.out.tfevents.*")
    log = EventAccumulator(str(events))
    log.Reload()
    for key in ("d_real", "d_fake", "d_accuracy", "d_accuracy_real", "d_accuracy_fake", "grad_norm", "d_grad_norm",
                "ema_distance", "ema_decay", "loss_adv"):
        values = [e.value for e in log.Scalars(key)]
        assert [e.step for e in log.Scalars(key)] == list(range(1, steps + 1)), key
        assert all(math.isfinite(v) for v in values), (key, values)
    assert [e.value for e in log.Scalars("d_accuracy")] == [1.0] * steps
    assert all(e.value > 0 for e in log.Scalars("d_grad_norm"))
    assert all(e.value - f.value > 30 for e, f in zip(log.Scalars("d_real"), log.Scalars("d_fake")))
    # The warm-up's decays, as logged: update k has min(0.999, 1 - (1 + (k - 1))^(-2/3)); the first copies the LoRA.
    decays = [e.value for e in log.Scalars("ema_decay")]
    assert decays == pytest.approx([min(0.999, 1 - k ** (-2 / 3)) for k in range(1, steps + 1)], abs=1e-6)
    assert [e.value for e in log.Scalars("ema_distance")][0] == pytest.approx(0.0, abs=1e-6)  # EMA = LoRA after a copy
