"""The diffusion schedule as YOSO uses it (SPEC section 1 and the weights of section 2).

Timesteps are integers in [0, num_train_timesteps). With ``alphas_cumprod`` from the base model's
scheduler config:

    a_t = sqrt(alphas_cumprod[t]),  s_t = sqrt(1 - alphas_cumprod[t]),  SNR(t) = (a_t / s_t)^2
    x_t = a_t x0 + s_t eps

The generator's clean estimate uses the LCM boundary condition so that LCMScheduler inference matches
training:  f(x_t, t) = c_skip(t) x_t + c_out(t) x0(G(x_t, t, c)).
"""

import torch

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


class YOSOSchedule:
    def __init__(self, alphas_cumprod, prediction_type="epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(self.alphas_cumprod)
        # float64 tables, cast on use: fp32 loses ~1e-4 relative precision in SNR near t = 999.
        self._a = self.alphas_cumprod.sqrt()
        self._s = (1.0 - self.alphas_cumprod).sqrt()

    def to(self, device):
        """Keep the tables on ``device`` (the training step's), so that indexing them with t copies nothing."""
        self.alphas_cumprod, self._a, self._s = (x.to(device) for x in (self.alphas_cumprod, self._a, self._s))
        return self

    @classmethod
    def from_scheduler(cls, scheduler, prediction_type=None):
        """Build from any diffusers scheduler of the base model (its ``alphas_cumprod`` and ``prediction_type``)."""
        return cls(scheduler.alphas_cumprod, prediction_type or scheduler.config.prediction_type)

    def _take(self, table, t, like):
        # Shape [B] -> [B, 1, 1, 1] so the factors broadcast over latents of any spatial size.
        values = table.to(t.device)[t.long()]
        return values.to(like.dtype if like is not None else torch.float32).view(-1, *([1] * (like.dim() - 1) if like is not None else []))

    def alpha(self, t, like=None):
        return self._take(self._a, t, like)

    def sigma(self, t, like=None):
        return self._take(self._s, t, like)

    def snr(self, t):
        """SNR(t) in float64, shape [B]."""
        return (self._a.to(t.device)[t.long()] / self._s.to(t.device)[t.long()]) ** 2

    def add_noise(self, x0, eps, t):
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * eps

    def x0_from_output(self, model_output, x_t, t):
        """The clean latent implied by the UNet output at (x_t, t)."""
        a, s = self.alpha(t, x_t), self.sigma(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * model_output) / a
        return a * x_t - s * model_output

    @staticmethod
    def boundary_scalings(t, like=None):
        """LCM's c_skip(t), c_out(t) with sigma_data = 0.5 and timestep scaling 10 (c_skip(0) = 1, c_out(0) = 0)."""
        scaled = TIMESTEP_SCALING * t.double()
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
        if like is None:
            return c_skip, c_out
        shape = (-1,) + (1,) * (like.dim() - 1)
        return c_skip.to(like.dtype).view(shape), c_out.to(like.dtype).view(shape)

    def clean_estimate(self, model_output, x_t, t):
        """f(x_t, t) = c_skip(t) x_t + c_out(t) x0(model_output)."""
        c_skip, c_out = self.boundary_scalings(t, like=x_t)
        return c_skip * x_t + c_out * self.x0_from_output(model_output, x_t, t)

    @staticmethod
    def earlier(t, gap):
        """max(t - gap, 0): the less-noisy partner timestep (250 for the cooperative real sample, 25 for consistency)."""
        return (t - gap).clamp(min=0)

    def kl_weight(self, t, gamma):
        """min(SNR(t), gamma), float32 [B]: the weight of the MSE to the teacher latents."""
        return self.snr(t).clamp(max=gamma).float()

    def consistency_weight(self, t, t_prev, gamma):
        """min(1 / (s_t/a_t - s_tp/a_tp), gamma), float32 [B]; gamma where t == t_prev (an infinite weight)."""
        a, s = self._a.to(t.device), self._s.to(t.device)
        gap = s[t.long()] / a[t.long()] - s[t_prev.long()] / a[t_prev.long()]
        weight = torch.where(gap > 0, 1.0 / gap.clamp(min=1e-30), torch.full_like(gap, float("inf")))
        return weight.clamp(max=gamma).float()
