"""YOSO's losses (SPEC section 2). Every per-sample weight is a [B] tensor; results are fp32 scalars."""

from dataclasses import dataclass

import torch.nn.functional as F

GAN_REDUCTIONS = ("batch", "sample")


@dataclass(kw_only=True)
class YOSOLossConfig:
    """The losses' weights, gaps and reductions (SPEC sections 2 and 4)."""

    lambda_con: float = 2.0
    lambda_kl: float = 0.5
    lambda_adv: float = 1.0
    snr_gamma: float = 5.0
    coop_gap: int = 250
    consistency_gap: int = 25
    gan_loss_reduction: str = "batch"


def _per_sample_mse(a, b):
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def consistency_loss(features_pred, features_target, weight):
    """Latent perceptual consistency: mean_b( w_con(t) * mean((F(pred) - F(y))^2) )."""
    return (weight * _per_sample_mse(features_pred, features_target)).mean()


def data_loss(pred, target_latents, weight):
    """The MSE to the teacher latents ("KL" in the public code): mean_b( min(SNR(t), gamma) * mean((pred - x0)^2) )."""
    return (weight * _per_sample_mse(pred, target_latents)).mean()


def _softplus_of(logits, sign, reduction):
    # "batch" averages the logits over the batch before the softplus, as the public script does;
    # "sample" is the paper's expectation of the per-sample softplus.
    if reduction == "batch":
        return F.softplus(sign * logits.float().mean())
    if reduction == "sample":
        return F.softplus(sign * logits.float()).mean()
    raise ValueError(f"--gan_loss_reduction must be one of {GAN_REDUCTIONS}, got {reduction!r}")


def discriminator_loss(logits_real, logits_fake, reduction="batch"):
    """L_D = softplus(-D(real)) + softplus(D(fake))."""
    return _softplus_of(logits_real, -1.0, reduction) + _softplus_of(logits_fake, 1.0, reduction)


def generator_adversarial_loss(logits_fake, reduction="batch"):
    """L_adv = softplus(-D(pred))."""
    return _softplus_of(logits_fake, -1.0, reduction)
