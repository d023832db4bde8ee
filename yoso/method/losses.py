"""YOSO's losses (SPEC section 2). Every per-sample weight is a [B] tensor; results are fp32 scalars."""

from dataclasses import dataclass

import torch.nn.functional as F

GAN_REDUCTIONS = ("batch", "sample")
KL_WEIGHTINGS = ("batch", "sample")
LOSS_SPACES = ("lpl", "mse")  # through the feature net F (latent perceptual), or plain MSE in latent space


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
    kl_weighting: str = "batch"
    consistency_loss: str = "lpl"
    kl_loss: str = "mse"

    def __post_init__(self):
        for name, allowed in (("gan_loss_reduction", GAN_REDUCTIONS), ("kl_weighting", KL_WEIGHTINGS),
                              ("consistency_loss", LOSS_SPACES), ("kl_loss", LOSS_SPACES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")


def _per_sample_mse(a, b):
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def consistency_loss(pred, target, weight):
    """Consistency: mean_b( w_con(t) * mean((pred - y)^2) ), on F's features (latent perceptual) or on latents."""
    return (weight * _per_sample_mse(pred, target)).mean()


def consistency_loss_part(pred, target, weight, batch):
    """The part of :func:`consistency_loss` that these samples (of a batch of ``batch``) make: the parts of a
    batch's pieces add up to the loss, and each has the loss's gradient w.r.t. its samples."""
    return (weight * _per_sample_mse(pred, target)).sum() / batch


def data_loss_part(pred, target, weight, batch_weight_mean, batch, weighting="batch"):
    """The part of :func:`data_loss` that these samples make (``weight``: theirs; ``batch_weight_mean``: the
    whole batch's mean weight, which "batch" weighting multiplies every sample by)."""
    per_sample = _per_sample_mse(pred, target)
    if weighting == "batch":
        return batch_weight_mean * per_sample.sum() / batch
    if weighting == "sample":
        return (weight * per_sample).sum() / batch
    raise ValueError(f"--kl_weighting must be one of {KL_WEIGHTINGS}, got {weighting!r}")


def data_loss(pred, target, weight, weighting="batch"):
    """The MSE to the data latents x0 ("KL" in the public code), weighted by w = min(SNR(t), gamma):

    "batch"   mean_b(w) * mean_all((pred - x0)^2): what the released script computes (its per-sample mean
              runs over no dimension of a [B] tensor, which PyTorch reads as all of them);
    "sample"  mean_b( w_b * mean((pred_b - x0_b)^2) ): the per-sample weighting its code was written for.
    """
    per_sample = _per_sample_mse(pred, target)
    if weighting == "batch":
        return weight.mean() * per_sample.mean()
    if weighting == "sample":
        return (weight * per_sample).mean()
    raise ValueError(f"--kl_weighting must be one of {KL_WEIGHTINGS}, got {weighting!r}")


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
