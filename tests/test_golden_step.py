"""The golden step: one YOSOTrainingStep against a straight-line implementation of SPEC section 2, written
here from the formulas (diffusers' scheduler tensors and the models' own modules, no math from yoso/).

With fixed x0, eps and t on the tiny models, the step's four losses and the gradients it hands to D's and
G's optimizers must equal the reference's to 1e-5, for both --kl_weighting and both --gan_loss_reduction
values, and for --consistency_loss mse, --kl_loss lpl and --input_perturbation. Negative controls show the
comparison would catch six plausible mistakes.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from harness import PROMPTS, build_trainer, make_batch

LR, WEIGHT_DECAY, ADAM_EPS, BETA2 = 1e-3, 1e-2, 1e-8, 0.999
GAMMA, COOP_GAP, CONSISTENCY_GAP = 5.0, 250, 25
LAMBDA_CON, LAMBDA_KL, LAMBDA_ADV = 2.0, 0.5, 1.0
TOL = 1e-5


def reference_step(unet, discriminator, alphas_cumprod, c, x0, eps, t, kl_weighting, gan_reduction,
                   consistency_loss="lpl", kl_loss="mse", eps_t=None, score_at_t_d=False, target_at_t_d=False,
                   swap_weighting=False, perturb_x_td=False, mse_con_weighted_kl=False, lpl_kl_to_target=False):
    """SPEC section 2 (and 7b's variants), straight-line. Returns the losses and the gradients D's and G's
    optimizers see. ``eps_t``: x_t's noise under --input_perturbation (eps + p * fresh noise); x_td and x_tp
    keep ``eps`` (SPEC section 2, as released). The keyword flags after it are the negative controls'
    mistakes."""
    ac = alphas_cumprod.double()

    def coef(tt):
        a, s = ac[tt].sqrt(), (1 - ac[tt]).sqrt()
        return a.float().view(-1, 1, 1, 1), s.float().view(-1, 1, 1, 1)

    def f(x, tt):  # the LCM boundary condition around the epsilon-prediction clean estimate
        a, s = coef(tt)
        x0_hat = (x - s * unet(x, tt, c).sample.float()) / a
        scaled = 10.0 * tt.double()
        c_skip = (0.25 / (scaled**2 + 0.25)).float().view(-1, 1, 1, 1)
        c_out = (scaled / (scaled**2 + 0.25).sqrt()).float().view(-1, 1, 1, 1)
        return c_skip * x + c_out * x0_hat

    def features(z):  # F: the base UNet's encoder half (LoRA off) at timestep 0, mid-block output
        unet.disable_adapters()
        try:
            emb = unet.time_embedding(unet.time_proj(torch.zeros(z.shape[0], dtype=torch.long)).to(z.dtype))
            h = unet.conv_in(z)
            for block in unet.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=c)
                else:
                    h, _ = block(hidden_states=h, temb=emb)
            return unet.mid_block(h, emb, encoder_hidden_states=c)
        finally:
            unet.enable_adapters()

    def softplus_mean(logits, sign):
        return F.softplus(sign * logits.mean()) if gan_reduction == "batch" else F.softplus(sign * logits).mean()

    def mse_per_sample(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    t_d, t_p = (t - COOP_GAP).clamp(min=0), (t - CONSISTENCY_GAP).clamp(min=0)
    eps_t = eps if eps_t is None else eps_t
    noised = {}
    for name, tt, noise in (("t", t, eps_t), ("t_d", t_d, eps_t if perturb_x_td else eps), ("t_p", t_p, eps)):
        a, s = coef(tt)
        noised[name] = a * x0 + s * noise
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]

    pred = f(noised["t"], t)
    with torch.no_grad():
        real = f(noised["t_d"], t_d)
        target = f(noised["t_d"], t_d) if target_at_t_d else f(noised["t_p"], t_p)

    # D's update: real and the detached fake, both scored at t.
    t_score = t_d if score_at_t_d else t
    loss_d = softplus_mean(discriminator(real, t_score, c), -1.0) + softplus_mean(discriminator(pred.detach(), t_score, c), 1.0)
    d_params = list(discriminator.parameters())
    d_grads = torch.autograd.grad(loss_d, d_params)
    # AdamW's first step with beta1 = 0: p <- p (1 - lr wd) - lr g / (|g| + eps).
    updated = copy.deepcopy(discriminator)
    with torch.no_grad():
        for p, g in zip(updated.parameters(), d_grads):
            p.mul_(1 - LR * WEIGHT_DECAY).sub_(LR * g / (g.abs() + ADAM_EPS))
    updated.requires_grad_(False)

    # G's losses.
    snr = ac[t] / (1 - ac[t])
    w_kl = snr.clamp(max=GAMMA).float()
    gap = (1 - ac[t]).sqrt() / ac[t].sqrt() - (1 - ac[t_p]).sqrt() / ac[t_p].sqrt()
    w_con = torch.where(gap > 0, 1 / gap.clamp(min=1e-30), torch.full_like(gap, float("inf"))).clamp(max=GAMMA).float()
    with torch.no_grad():
        features_target, features_x0 = features(target), features(x0)
    if consistency_loss == "lpl":  # latent perceptual: through F, F's weights and the target without a graph
        loss_con = (w_con * mse_per_sample(features(pred), features_target)).mean()
    else:  # plain latent MSE to the target, the same w_con
        loss_con = ((w_kl if mse_con_weighted_kl else w_con) * mse_per_sample(pred, target)).mean()
    if kl_loss == "lpl":  # F(pred) against F(x0), the same weighting as the latent form
        per_sample = mse_per_sample(features(pred), features_target if lpl_kl_to_target else features_x0)
    else:
        per_sample = mse_per_sample(pred, x0)
    batch_form = (kl_weighting == "batch") != swap_weighting
    loss_kl = w_kl.mean() * per_sample.mean() if batch_form else (w_kl * per_sample).mean()
    loss_adv = softplus_mean(updated(pred, t, c), -1.0)
    loss_g = LAMBDA_CON * loss_con + LAMBDA_KL * loss_kl + LAMBDA_ADV * loss_adv
    g_grads = torch.autograd.grad(loss_g, lora)
    losses = {"loss_d": loss_d, "loss_con": loss_con, "loss_kl": loss_kl, "loss_adv": loss_adv}
    return {k: v.detach() for k, v in losses.items()}, [g.detach() for g in d_grads], [g.detach() for g in g_grads]


def run_both(tiny_base, kl_weighting, gan_reduction, consistency_loss="lpl", kl_loss="mse", input_perturbation=0.0,
             mistakes=("score_at_t_d", "target_at_t_d", "swap_weighting")):
    trainer, models = build_trainer(tiny_base, None, use_ema=False, lr=LR, kl_weighting=kl_weighting,
                                    gan_loss_reduction=gan_reduction, max_grad_norm=1e9,
                                    consistency_loss=consistency_loss, kl_loss=kl_loss,
                                    input_perturbation=input_perturbation)
    # The reference's constants are the recipe's (SPEC section 4), and the step runs with them.
    cfg = trainer.config
    assert (cfg.lambda_con, cfg.lambda_kl, cfg.lambda_adv) == (LAMBDA_CON, LAMBDA_KL, LAMBDA_ADV) == (2.0, 0.5, 1.0)
    assert (cfg.snr_gamma, cfg.coop_gap, cfg.consistency_gap) == (GAMMA, COOP_GAP, CONSISTENCY_GAP) == (5.0, 250, 25)
    assert (cfg.consistency_loss, cfg.kl_loss, trainer.input_perturbation) == (consistency_loss, kl_loss,
                                                                                input_perturbation)
    unet, discriminator = models.unet, models.discriminator
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a LoRA away from its identity start, so every LoRA tensor gets a gradient
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    batch = make_batch(models, PROMPTS)
    x0 = torch.randn(4, *models.latent_shape, generator=generator)
    eps = torch.randn(4, *models.latent_shape, generator=generator)
    t = torch.tensor([999, 640, 260, 12])  # a spread of SNRs: the two weightings differ; t_d = 0 at t = 12
    # x_t's noise as the step draws it: eps + p * fresh noise (the draw itself is checked in the test).
    drawn_eps, _, drawn_eps_t = trainer.sample_noise(4, torch.Generator().manual_seed(3), torch.device("cpu"))
    eps_t = eps + (drawn_eps_t - drawn_eps)
    batch["latents"] = x0
    with torch.no_grad():
        c = models.text_encoder(batch["input_ids"], return_dict=False)[0]
    alphas_cumprod = models.noise_scheduler.alphas_cumprod

    def reference(**mistake):
        return reference_step(unet, discriminator, alphas_cumprod, c, x0, eps, t, kl_weighting, gan_reduction,
                              consistency_loss, kl_loss, eps_t, **mistake)

    expected = reference()
    variants = {name: reference(**{name: True}) for name in mistakes}

    seen = {}
    d_step, g_step = trainer.optimizer_d.step, trainer.optimizer_g.step

    def record(key, params, inner):
        def step(*args, **kwargs):
            seen[key] = [p.grad.detach().clone() for p in params]
            return inner(*args, **kwargs)
        return step

    trainer.optimizer_d.step = record("d", list(discriminator.parameters()), d_step)
    trainer.optimizer_g.step = record("g", [p for n, p in unet.named_parameters() if "lora_" in n], g_step)
    trainer.sample_noise = lambda batch_size, gen, device: (eps, t, eps_t)
    logs = trainer.step(batch, torch.Generator().manual_seed(0))
    return expected, variants, logs, seen


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("kl_weighting", ["batch", "sample"])
@pytest.mark.parametrize("gan_reduction", ["batch", "sample"])
def test_step_matches_the_straight_line_reference(tiny_base, kl_weighting, gan_reduction):
    (losses, d_grads, g_grads), variants, logs, seen = run_both(tiny_base, kl_weighting, gan_reduction)
    for name, value in losses.items():
        assert abs(logs[name].item() - value.item()) <= TOL * max(1.0, abs(value.item())), (name, logs[name], value)
    assert len(seen["d"]) == len(d_grads) and len(seen["g"]) == len(g_grads) > 0
    assert max_difference(seen["d"], d_grads) <= TOL
    assert max_difference(seen["g"], g_grads) <= TOL
    assert min(g.abs().max().item() for g in g_grads) > 0  # every LoRA tensor has a gradient to compare

    # Negative controls: each mistake moves what it touches beyond 10x the tolerance.
    mistaken = {"score_at_t_d": "loss_d", "target_at_t_d": "loss_con", "swap_weighting": "loss_kl"}
    for mistake, loss in mistaken.items():
        wrong_losses, wrong_d, wrong_g = variants[mistake]
        assert abs(wrong_losses[loss].item() - logs[loss].item()) > 10 * TOL, mistake
        assert max_difference(seen["g"], wrong_g) > 10 * TOL, mistake
    assert max_difference(seen["d"], variants["score_at_t_d"][1]) > 10 * TOL


@pytest.mark.parametrize("consistency_loss, kl_loss", [("mse", "lpl"), ("lpl", "lpl")])
def test_loss_variants_and_input_perturbation_match_the_reference(tiny_base, consistency_loss, kl_loss):
    """SPEC 7b's --consistency_loss mse and --kl_loss lpl, with --input_perturbation (x_t's noise only)."""
    perturbation = 1.0  # large, so that the tiny models show the x_td mistake well beyond the tolerance
    mistakes = ("perturb_x_td", "lpl_kl_to_target") + (("mse_con_weighted_kl",) if consistency_loss == "mse" else ())
    (losses, d_grads, g_grads), variants, logs, seen = run_both(
        tiny_base, "batch", "batch", consistency_loss, kl_loss, perturbation, mistakes)
    for name, value in losses.items():
        assert abs(logs[name].item() - value.item()) <= TOL * max(1.0, abs(value.item())), (name, logs[name], value)
    assert len(seen["g"]) == len(g_grads) > 0
    assert max_difference(seen["d"], d_grads) <= TOL
    assert max_difference(seen["g"], g_grads) <= TOL
    assert min(g.abs().max().item() for g in g_grads) > 0

    # Negative controls: perturbing x_td's noise too moves D's real sample (D's gradients) and, through D's
    # update, G's gradients; the MSE consistency weighted by w_kl moves loss_con; the LPL data
    # loss against the target's features moves loss_kl.
    # (The tiny D's loss itself hardly moves with its real sample, so the x_td mistake is judged by D's gradients.)
    mistaken = {"perturb_x_td": None, "lpl_kl_to_target": "loss_kl", "mse_con_weighted_kl": "loss_con"}
    for mistake in mistakes:
        wrong_losses, wrong_d, wrong_g = variants[mistake]
        if mistaken[mistake]:
            assert abs(wrong_losses[mistaken[mistake]].item() - logs[mistaken[mistake]].item()) > 10 * TOL, mistake
        assert max_difference(seen["g"], wrong_g) > 10 * TOL, mistake
    assert max_difference(seen["d"], variants["perturb_x_td"][1]) > 10 * TOL


def test_input_perturbation_draws_eps_plus_p_times_fresh_noise(tiny_base):
    """The step's own draw: eps_t - eps = p * (fresh N(0, 1) noise), the same fresh noise for any p."""
    draws = {}
    for p in (0.0, 0.1, 0.3):
        trainer, _ = build_trainer(tiny_base, None, use_ema=False, input_perturbation=p)
        draws[p] = trainer.sample_noise(64, torch.Generator().manual_seed(5), torch.device("cpu"))
    eps0, t0, eps_t0 = draws[0.0]
    assert torch.equal(eps_t0, eps0)
    extra = (draws[0.1][2] - draws[0.1][0]) / 0.1
    for p, (eps, t, eps_t) in draws.items():
        assert torch.equal(eps, eps0) and torch.equal(t, t0)  # the perturbation draws after eps and t
        assert torch.allclose(eps_t - eps, p * extra, atol=1e-6)
    assert abs(extra.std().item() - 1.0) < 0.05 and abs(extra.mean().item()) < 0.05
    assert (extra - eps0).abs().max() > 1.0  # fresh noise, not eps again


def test_batch_weighting_is_the_released_reduction():
    """The released script's per-sample mean runs `.mean(dim=[])` on a [B] tensor; PyTorch reduces all dims."""
    from yoso.method.losses import data_loss

    generator = torch.Generator().manual_seed(0)
    pred, x0 = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    weight = torch.tensor([0.0047, 0.38, 5.0])
    released = F.mse_loss(pred, x0, reduction="none").mean(dim=[1, 2, 3])  # per-sample MSE
    released = released.mean(dim=list(range(1, len(released.shape)))) * weight.mean()  # `.mean(dim=[])`: all dims
    assert released.shape == ()
    assert abs(data_loss(pred, x0, weight, "batch").item() - released.item()) <= 1e-7
    per_sample = (weight * F.mse_loss(pred, x0, reduction="none").mean(dim=[1, 2, 3])).mean()
    assert abs(data_loss(pred, x0, weight, "sample").item() - per_sample.item()) <= 1e-7
    assert abs(released.item() - per_sample.item()) > 0.1
