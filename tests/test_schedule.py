"""Schedule math (issue 3, item 1): weights, x0 from epsilon and v, boundary scalings, gaps."""

import numpy as np
import pytest
import torch

from yoso.method.schedule import YOSOSchedule
from yoso.testing import SD15_SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def sd15():
    from diffusers import DDPMScheduler

    return YOSOSchedule.from_scheduler(DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG))


def independent_alphas_cumprod():
    # SD1.5's "scaled_linear" betas, computed here without diffusers.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


# SPEC section 2: reference weights at the SD1.5 schedule with gamma = 5, as printed there.
SPEC_WEIGHTS = {250: (2.07, 5), 500: (0.38, 5), 750: (0.06, 2.45), 900: (0.014, 0.99), 999: (0.0047, 0.49)}


@pytest.mark.parametrize("t", sorted(SPEC_WEIGHTS))
def test_weights_match_spec_table(sd15, t):
    w_kl, w_con = SPEC_WEIGHTS[t]
    tt = torch.tensor([t])
    got_kl = sd15.kl_weight(tt, 5.0).item()
    got_con = sd15.consistency_weight(tt, sd15.earlier(tt, 25), 5.0).item()
    # The table prints 2-3 significant digits; the weights agree with it to that precision.
    digits = len(str(w_kl).split(".")[1])
    assert round(got_kl, digits) == pytest.approx(w_kl, abs=1e-12)
    assert round(got_con, 2) == pytest.approx(w_con, abs=1e-12)


def test_weights_match_independent_formula(sd15):
    abar = independent_alphas_cumprod()
    t = np.array([250, 500, 750, 900, 999])
    tp = np.maximum(t - 25, 0)
    snr = abar[t] / (1 - abar[t])
    ratio = lambda k: np.sqrt(1 - abar[k]) / np.sqrt(abar[k])  # noqa: E731
    w_con = np.minimum(1.0 / (ratio(t) - ratio(tp)), 5.0)
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(sd15.kl_weight(tt, 5.0).numpy(), np.minimum(snr, 5.0), rtol=1e-5)  # diffusers keeps alphas_cumprod in fp32
    np.testing.assert_allclose(sd15.consistency_weight(tt, torch.from_numpy(tp), 5.0).numpy(), w_con, rtol=1e-5)
    assert abs(sd15.kl_weight(tt, 5.0)[0].item() - 2.0655) < 1e-3


def test_consistency_weight_is_gamma_where_gap_vanishes(sd15):
    t = torch.tensor([0, 0, 10])
    assert sd15.consistency_weight(t, torch.tensor([0, 0, 10]), 5.0).tolist() == [5.0, 5.0, 5.0]


def test_gaps_clamp_at_zero(sd15):
    t = torch.tensor([0, 10, 25, 100, 250, 999])
    assert sd15.earlier(t, 25).tolist() == [0, 0, 0, 75, 225, 974]
    assert sd15.earlier(t, 250).tolist() == [0, 0, 0, 0, 0, 749]


def test_x0_from_epsilon_and_v(sd15):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999])
    x_t = sd15.add_noise(x0, eps, t)
    torch.testing.assert_close(sd15.x0_from_output(eps, x_t, t), x0, atol=2e-4, rtol=0)
    v_schedule = YOSOSchedule(sd15.alphas_cumprod, "v_prediction")
    v = v_schedule.alpha(t, x0) * eps - v_schedule.sigma(t, x0) * x0
    torch.testing.assert_close(v_schedule.x0_from_output(v, x_t, t), x0, atol=1e-5, rtol=0)


def test_prediction_type_override_and_validation(sd15):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert YOSOSchedule.from_scheduler(scheduler).prediction_type == "epsilon"
    assert YOSOSchedule.from_scheduler(scheduler, "v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        YOSOSchedule(sd15.alphas_cumprod, "sample")


def test_boundary_scalings_match_lcm_scheduler():
    """Training's c_skip / c_out are LCMScheduler's, so 1- and 2-step LCM inference sees what training made."""
    from diffusers import LCMScheduler

    lcm = LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    t = torch.tensor([0, 1, 5, 25, 499, 999])
    c_skip, c_out = YOSOSchedule.boundary_scalings(t)
    for i, step in enumerate(t.tolist()):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(float(ref_skip), rel=1e-9, abs=1e-15)
        assert c_out[i].item() == pytest.approx(float(ref_out), rel=1e-9, abs=1e-15)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert c_out[2].item() > 0.999  # t >= 5: c_out is ~1


def test_clean_estimate_at_t0_is_the_input(sd15):
    x_t = torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(sd15.clean_estimate(out, x_t, torch.tensor([0, 0])), x_t, atol=0, rtol=0)
    t = torch.tensor([999, 600])
    expected = YOSOSchedule.boundary_scalings(t, like=x_t)[1] * sd15.x0_from_output(out, x_t, t) + \
        YOSOSchedule.boundary_scalings(t, like=x_t)[0] * x_t
    torch.testing.assert_close(sd15.clean_estimate(out, x_t, t), expected)


def test_losses_reductions():
    from yoso.method.losses import consistency_loss, data_loss, discriminator_loss, generator_adversarial_loss

    logits = torch.tensor([2.0, -4.0])
    sp = torch.nn.functional.softplus
    assert generator_adversarial_loss(logits, "batch").item() == pytest.approx(sp(torch.tensor(1.0)).item())
    assert generator_adversarial_loss(logits, "sample").item() == pytest.approx(((sp(-logits[0]) + sp(-logits[1])) / 2).item())
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    assert discriminator_loss(real, fake, "batch").item() == pytest.approx((sp(torch.tensor(-2.0)) + sp(torch.tensor(-0.5))).item())
    with pytest.raises(ValueError, match="gan_loss_reduction"):
        discriminator_loss(real, fake, "mean")
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    w = torch.tensor([2.0, 0.5])
    assert data_loss(a, b, w, "sample").item() == pytest.approx((2 * 1 + 0.5 * 4) / 2)
    assert data_loss(a, b, w, "batch").item() == pytest.approx((2 + 0.5) / 2 * (1 + 4) / 2)  # mean_b(w) x mean MSE
    assert data_loss(a, b, w).item() == data_loss(a, b, w, "batch").item()  # the released form is the default
    with pytest.raises(ValueError, match="kl_weighting"):
        data_loss(a, b, w, "mean")
    assert consistency_loss(a, b, w).item() == pytest.approx((2 * 1 + 0.5 * 4) / 2)
