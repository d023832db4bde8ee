"""Latent statistics for one-step sampling with the informative prior (IPI): how they are accumulated
during training, saved next to the LoRA, loaded for inference and computed from samples.

The file (``latent_stats.safetensors``): ``mean`` float32 ``[C, h, w]`` (mean training latent, in the
VAE-scaled latent space), ``std`` float32 scalar (std of the latents around that mean, over all
elements), ``count`` int64 scalar (latents averaged).
"""

from pathlib import Path

import torch

from yoso.utils.atomic import atomic_path

LATENT_STATS_NAME = "latent_stats.safetensors"


class LatentStatsError(ValueError):
    """A latent statistics file that cannot be used; the message is one line naming the file."""


def _first_line(exc):
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class LatentStats:
    """Running mean latent ``[C, h, w]`` and scalar std of the training latents.

    Sums are float64. ``update`` is given the latents of the whole global batch (all ranks), so every rank
    holds the same statistics and the saved file does not depend on the number of processes. The sums live
    on ``device`` (the training's), so an update never waits for the device; reading them does.
    """

    def __init__(self, shape, device="cpu"):
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(shape, dtype=torch.float64, device=device)
        self._count = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def count(self):
        return int(self._count.item())

    def update(self, latents):
        """Add a batch ``[N, C, h, w]``; latents with a non-finite element (a skipped step's) are left out."""
        latents = latents.detach().to(self.sum.device, torch.float64)
        finite = torch.isfinite(latents).flatten(1).all(dim=1)
        latents = torch.where(finite.view(-1, *[1] * (latents.dim() - 1)), latents, 0.0)  # masked, no host sync
        self.sum += latents.sum(dim=0)
        self.sum_sq += latents.pow(2).sum(dim=0)
        self._count += finite.sum()

    def mean(self):
        return (self.sum / max(self.count, 1)).float().cpu()

    def std(self):
        """Std of all latent elements around the per-position mean."""
        mean = self.sum / max(self.count, 1)
        variance = (self.sum_sq / max(self.count, 1) - mean.pow(2)).mean().clamp(min=0)
        return float(variance.sqrt())

    def state_dict(self):
        return {"sum": self.sum.cpu().clone(), "sum_sq": self.sum_sq.cpu().clone(), "count": self.count}

    def load_state_dict(self, state):
        self.sum.copy_(state["sum"])
        self.sum_sq.copy_(state["sum_sq"])
        self._count.fill_(int(state["count"]))

    def save(self, path):
        return save_latent_stats(path, self.mean(), self.std(), self.count)


def compute_latent_stats(latents):
    """Mean latent ``[C, h, w]`` and the std of ``latents`` [N, C, h, w] around it, as the training
    accumulates them (one definition for training and for statistics made from samples)."""
    stats = LatentStats(latents.shape[1:])
    stats.update(latents)
    return stats.mean(), torch.tensor(stats.std(), dtype=torch.float32)


def save_latent_stats(path, mean, std, count):
    """Write ``mean`` [C, h, w], scalar ``std`` and ``count`` to ``path`` (safetensors), atomically."""
    from safetensors.torch import save_file

    mean = torch.as_tensor(mean).detach().to("cpu", torch.float32).contiguous()
    if mean.dim() != 3:
        raise ValueError(f"mean must have shape [C, h, w], got {tuple(mean.shape)}")
    std = torch.as_tensor(std).detach().to("cpu", torch.float32)
    if std.numel() != 1:
        raise ValueError(f"std must be a scalar, got shape {tuple(std.shape)}")
    count = int(count)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    tensors = {"mean": mean, "std": std.reshape(()).clone(), "count": torch.tensor(count, dtype=torch.int64)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return path


def load_latent_stats(path):
    """Read a latent statistics file: ``(mean [C, h, w] float32, std 0-dim float32 tensor)``.

    Raises :class:`LatentStatsError` for a missing, unreadable or malformed file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LatentStatsError(f"latent statistics file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise LatentStatsError(f"{path} is not a readable safetensors file: {_first_line(exc)}") from exc
    missing = [k for k in ("mean", "std") if k not in tensors]
    if missing:
        raise LatentStatsError(f"{path} is not a latent statistics file: no {' or '.join(missing)} tensor (has {sorted(tensors)})")
    mean, std = tensors["mean"].float(), tensors["std"].float()
    if mean.dim() != 3 or std.numel() != 1:
        raise LatentStatsError(f"{path}: expected mean [C, h, w] and a scalar std, got {tuple(mean.shape)} and {tuple(std.shape)}")
    std = std.reshape(())
    if not (torch.isfinite(mean).all() and torch.isfinite(std) and std > 0):
        raise LatentStatsError(f"{path}: mean must be finite and std finite and > 0 (std = {std.item()})")
    return mean, std
