"""Training-health signals of the GAN part: what a user needs to see a run going wrong before it ends.

Logged every optimizer step, to every tracker (``accelerator.log``), beside the losses:

  d_real, d_fake            D's mean logit on the real (G's less-noisy denoising) and the fake sample
  d_accuracy                share of D's calls that are right: real scored > 0 and fake < 0 (``_real``, ``_fake``: each half)
  grad_norm, d_grad_norm    G's (LoRA) and D's gradient norm before clipping (D is not clipped)
  ema_distance              |EMA - LoRA| / |LoRA| over all LoRA tensors (with --use_ema)

All are device tensors from the step; they reach the host in the loss averager's one gather per optimizer step.
``HealthMonitor`` reads them and returns a one-line warning, once per episode, when over ``window``
consecutive optimizer steps D wins outright (accuracy >= ``WIN_ACCURACY`` at every step) or collapses
(the window's mean accuracy within ``COLLAPSE_TOLERANCE`` of 0.5 while G's adversarial loss falls).
"""

import math

import torch

WIN_ACCURACY = 0.99
COLLAPSE_TOLERANCE = 0.05


def discriminator_accuracy(logits_real, logits_fake):
    """(accuracy, accuracy on real, accuracy on fake) as device tensors: real scored > 0, fake < 0."""
    real = (logits_real.detach().float() > 0).float().mean()
    fake = (logits_fake.detach().float() < 0).float().mean()
    return (real + fake) / 2, real, fake


def gradient_norm(parameters, scaler=None):
    """The L2 norm of the gradients of ``parameters`` (a device tensor, no host read); a fp16 gradient scaler's
    scale is divided out. Parameters without a gradient count as zero."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if scaler is not None:
        scale = getattr(scaler, "_scale", None)
        norm = norm / (scale.reshape(()) if scale is not None else scaler.get_scale())
    return norm


@torch.no_grad()
def ema_distance(ema):
    """|EMA - LoRA| / |LoRA| over every LoRA tensor (a device tensor), or None without an EMA."""
    if ema is None:
        return None
    diff = torch.zeros((), device=ema.shadow[0].device)
    ref = torch.zeros((), device=ema.shadow[0].device)
    for s, p in zip(ema.shadow, ema.parameters):
        p = p.detach().float()
        diff += (s - p).square().sum()
        ref += p.square().sum()
    return diff.sqrt() / ref.sqrt().clamp_min(1e-12)


def _slope(values):
    """Least-squares slope of ``values`` over their index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    var = sum((i - mean_x) ** 2 for i in range(n))
    return sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / var if var else 0.0


class HealthMonitor:
    """Watches ``d_accuracy`` and ``loss_adv`` per optimizer step; ``observe`` returns a warning line when a
    condition has held for ``window`` consecutive steps, once per episode (the condition must stop holding
    before it warns again). ``window`` 0 disables it."""

    def __init__(self, window):
        if window < 0:
            raise ValueError(f"--health_window must be >= 0, got {window}")
        self.window = int(window)
        self.accuracy, self.loss_adv = [], []
        self.active = {"win": False, "collapse": False}
        self.warnings = []

    def _conditions(self):
        acc, adv = self.accuracy[-self.window:], self.loss_adv[-self.window:]
        if len(acc) < self.window:
            return {"win": False, "collapse": False}
        return {"win": min(acc) >= WIN_ACCURACY,
                "collapse": abs(sum(acc) / len(acc) - 0.5) <= COLLAPSE_TOLERANCE and _slope(adv) < 0}

    def observe(self, step, scalars):
        if not self.window or "d_accuracy" not in scalars:
            return None
        accuracy, adv = float(scalars["d_accuracy"]), float(scalars.get("loss_adv", math.nan))
        if not (math.isfinite(accuracy) and math.isfinite(adv)):
            return None
        self.accuracy.append(accuracy)
        self.loss_adv.append(adv)
        del self.accuracy[:-self.window], self.loss_adv[:-self.window]
        message = None
        for kind, holds in self._conditions().items():
            if holds and not self.active[kind]:
                message = self.message(kind, step)
                self.warnings.append((step, kind))
            self.active[kind] = holds
        return message

    def message(self, kind, step):
        first = step - self.window + 1
        if kind == "win":
            return (f"training health: the discriminator wins outright: accuracy >= {WIN_ACCURACY:g} at every step "
                    f"from {first} to {step} (--health_window {self.window}); G gets little signal from it "
                    "(try a lower --discriminator_learning_rate)")
        return (f"training health: the discriminator collapsed: accuracy {sum(self.accuracy) / len(self.accuracy):.2f} "
                f"(~0.5) over steps {first} to {step} while G's adversarial loss falls (--health_window {self.window}); "
                "D no longer tells real from fake (try a higher --discriminator_learning_rate)")
