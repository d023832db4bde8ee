"""The teacher: a text-to-image pipeline (SD-Turbo by default) that turns prompts into training latents.

SD-Turbo shares SD1.5's VAE latent space, so its ``output_type="latent"`` output is used directly as the
clean latent x0, with no decode / encode round trip. Its noise is drawn per sample from a seed derived
from (run seed, epoch, prompt index), so a latent can be regenerated (or cached) exactly.
"""

import torch


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
