"""The teacher: a text-to-image pipeline (SD-Turbo by default) that turns prompts into training latents.

SD-Turbo shares SD1.5's VAE latent space, so its ``output_type="latent"`` output is used directly as the
clean latent x0, with no decode / encode round trip. Its noise is drawn per sample from a seed derived
from (run seed, epoch, prompt index), so a latent can be regenerated (or cached) exactly.
"""

import torch

# The file format is inference's (it reads the file); the training writes it through the same function.
from .inference import LATENT_STATS_NAME, save_latent_stats  # noqa: F401  (re-exported for the training script)


def teacher_noise(seeds, shape, device, dtype):
    """Plain N(0, I) noise, one generator per sample (pipelines scale it by ``init_noise_sigma`` themselves)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def teacher_noise_seeds(seed, epoch, indices):
    # A fixed mixing of the three integers; distinct for distinct (epoch, index) pairs in any real run.
    return [(seed * 1_000_003 + epoch * 10_000_019 + int(i)) % (2**63 - 1) for i in indices]


class TeacherLatents:
    """Calls the teacher pipeline: prompts + noise -> clean latents ``[B, 4, res/8, res/8]``."""

    def __init__(self, pipeline, num_inference_steps=1, guidance_scale=0.0):
        self.pipeline = pipeline
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        pipeline.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def __call__(self, prompts, noise):
        return self.pipeline(
            prompt=list(prompts),
            latents=noise,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            output_type="latent",
        ).images


def load_teacher(path, dtype, device, revision=None, variant=None, cache_dir=None):
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(
        path, dtype=dtype, revision=revision, variant=variant, cache_dir=cache_dir
    )
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        if getattr(pipeline, name, None) is not None:
            setattr(pipeline, name, None)
    pipeline.to(device)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    return pipeline


class LatentStats:
    """Running mean latent ``[C, h, w]`` and scalar std of the teacher latents (for one-step IPI inference).

    Sums are float64. ``update`` is given the latents of the whole global batch (all ranks), so every rank
    holds the same statistics and the saved file does not depend on the number of processes.
    """

    def __init__(self, shape):
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.sum_sq = torch.zeros(shape, dtype=torch.float64)
        self.count = 0

    def update(self, latents):
        latents = latents.detach().to("cpu", torch.float64)
        self.sum += latents.sum(dim=0)
        self.sum_sq += latents.pow(2).sum(dim=0)
        self.count += latents.shape[0]

    def mean(self):
        return (self.sum / max(self.count, 1)).float()

    def std(self):
        """Std of all latent elements around the per-position mean."""
        mean = self.sum / max(self.count, 1)
        variance = (self.sum_sq / max(self.count, 1) - mean.pow(2)).mean().clamp(min=0)
        return float(variance.sqrt())

    def state_dict(self):
        return {"sum": self.sum.clone(), "sum_sq": self.sum_sq.clone(), "count": self.count}

    def load_state_dict(self, state):
        self.sum.copy_(state["sum"])
        self.sum_sq.copy_(state["sum_sq"])
        self.count = int(state["count"])

    def save(self, path):
        save_latent_stats(path, self.mean(), self.std(), self.count)
