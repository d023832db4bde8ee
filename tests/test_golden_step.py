"""The golden step: one YOSOTrainingStep against a straight-line implementation of SPEC section 2, written
here from the formulas (diffusers' scheduler tensors and the models' own modules, no math from yoso/).

With fixed x0, eps and t on the tiny models, the step's four losses and the gradients it hands to D's and
G's optimizers must equal the reference's to 1e-5, for both --kl_weighting and both --gan_loss_reduction
values. Negative controls show the comparison would catch three plausible mistakes.
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
                   score_at_t_d=False, target_at_t_d=False, swap_weighting=False):
    """SPEC section 2, straight-line. Returns the losses and the gradients D's and G's optimizers see."""
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
    noised = {}
    for name, tt in (("t", t), ("t_d", t_d), ("t_p", t_p)):
        a, s = coef(tt)
        noised[name] = a * x0 + s * eps
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
        features_target = features(target)
    loss_con = (w_con * mse_per_sample(features(pred), features_target)).mean()
    per_sample = mse_per_sample(pred, x0)
    batch_form = (kl_weighting == "batch") != swap_weighting
    loss_kl = w_kl.mean() * per_sample.mean() if batch_form else (w_kl * per_sample).mean()
    loss_adv = softplus_mean(updated(pred, t, c), -1.0)
    loss_g = LAMBDA_CON * loss_con + LAMBDA_KL * loss_kl + LAMBDA_ADV * loss_adv
    g_grads = torch.autograd.grad(loss_g, lora)
    losses = {"loss_d": loss_d, "loss_con": loss_con, "loss_kl": loss_kl, "loss_adv": loss_adv}
    return {k: v.detach() for k, v in losses.items()}, [g.detach() for g in d_grads], [g.detach() for g in g_grads]


def run_both(tiny_base, kl_weighting, gan_reduction):
    trainer, models = build_trainer(tiny_base, None, use_ema=False, lr=LR, kl_weighting=kl_weighting,
                                    gan_loss_reduction=gan_reduction, max_grad_norm=1e9)
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
    batch["latents"] = x0
    with torch.no_grad():
        c = models.text_encoder(batch["input_ids"], return_dict=False)[0]
    alphas_cumprod = models.noise_scheduler.alphas_cumprod

    def reference(**mistake):
        return reference_step(unet, discriminator, alphas_cumprod, c, x0, eps, t, kl_weighting, gan_reduction, **mistake)

    expected = reference()
    variants = {name: reference(**{name: True}) for name in ("score_at_t_d", "target_at_t_d", "swap_weighting")}

    seen = {}
    d_step, g_step = trainer.optimizer_d.step, trainer.optimizer_g.step

    def record(key, params, inner):
        def step(*args, **kwargs):
            seen[key] = [p.grad.detach().clone() for p in params]
            return inner(*args, **kwargs)
        return step

    trainer.optimizer_d.step = record("d", list(discriminator.parameters()), d_step)
    trainer.optimizer_g.step = record("g", [p for n, p in unet.named_parameters() if "lora_" in n], g_step)
    trainer.sample_noise = lambda batch_size, gen, device: (eps, t, eps)
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
