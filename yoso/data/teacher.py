"""The teacher: a text-to-image pipeline (SD-Turbo by default) that turns prompts into training latents.

SD-Turbo shares SD1.5's VAE latent space, so its ``output_type="latent"`` output is used directly as the
clean latent x0. A teacher in another latent space (SDXL-Turbo: the SDXL VAE's) gets a
:class:`~yoso.data.latent_space.LatentTranscoder`: its latents are decoded by its VAE and re-encoded by the
base's, so x0 is always in the base's space (whether to transcode is decided from the configs by
``yoso.data.latent_space.check_teacher_latents``). Its noise is drawn per sample from a seed derived from
(run seed, epoch, prompt index), so a latent can be regenerated (or cached) exactly. A scheduler that adds
noise between steps (SDXL-Turbo ships ``EulerAncestralDiscreteScheduler``) draws it from one generator per
sample seeded from the same seed, never from the global RNG: with several teacher steps a latent still
depends only on (seed, epoch, index), not on the batch it was generated in.
"""

import torch


def teacher_noise(seeds, shape, device, dtype):
    """Plain N(0, I) noise, one generator per sample (pipelines scale it by ``init_noise_sigma`` themselves)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def teacher_step_generators(seeds):
    """One CPU generator per sample for the noise a pipeline's scheduler adds *between* steps (ancestral
    samplers). Seeded from the sample's teacher seed, offset so that this stream is not the initial noise's."""
    return [torch.Generator().manual_seed((int(s) + 0x9E3779B97F4A7C15) % (2**63 - 1)) for s in seeds]


def teacher_noise_seeds(seed, epoch, indices):
    # A fixed mixing of the three integers; distinct for distinct (epoch, index) pairs in any real run.
    return [(seed * 1_000_003 + epoch * 10_000_019 + int(i)) % (2**63 - 1) for i in indices]


class TeacherLatents:
    """Calls the teacher pipeline: prompts + noise (in the teacher's latent shape) -> clean latents in the
    base model's latent space (transcoded when ``transcoder`` is given).

    The image size is the noise's size times the teacher's VAE factor and is passed as ``height``/``width``:
    SDXL pipelines condition on it (``original_size`` / ``target_size``), so SDXL-Turbo generating at the
    training ``--resolution`` (512 px) is told 512 px.
    """

    def __init__(self, pipeline, num_inference_steps=1, guidance_scale=0.0, transcoder=None):
        self.pipeline = pipeline
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.transcoder = transcoder
        pipeline.set_progress_bar_config(disable=True)

    def noise_shape(self, resolution):
        """The teacher's latent shape at ``resolution`` px: the shape of the noise it is called with."""
        factor = self.pipeline.vae_scale_factor
        return (self.pipeline.unet.config.in_channels, resolution // factor, resolution // factor)

    @torch.no_grad()
    def teacher_space_latents(self, prompts, noise, seeds=None):
        """The pipeline's own output: latents in the teacher's VAE space. ``seeds``: the samples' teacher
        seeds (``teacher_noise_seeds``); they seed the noise an ancestral scheduler adds between steps.
        Without them that noise comes from the global RNG (only harmless at 1 step)."""
        factor = self.pipeline.vae_scale_factor
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} teacher seeds for {len(prompts)} prompts")
        return self.pipeline(
            prompt=list(prompts),
            latents=noise,
            generator=None if seeds is None else teacher_step_generators(seeds),
            height=noise.shape[-2] * factor,
            width=noise.shape[-1] * factor,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            output_type="latent",
        ).images

    @torch.no_grad()
    def __call__(self, prompts, noise, seeds=None):
        latents = self.teacher_space_latents(prompts, noise, seeds)
        return latents if self.transcoder is None else self.transcoder(latents)


def load_vae(path, dtype=None, revision=None, variant=None, cache_dir=None):
    """An AutoencoderKL from a VAE folder / hub id (e.g. madebyollin/sdxl-vae-fp16-fix) or a pipeline's ``vae/``."""
    from diffusers import AutoencoderKL

    from yoso.data.latent_space import vae_subfolder

    subfolder = vae_subfolder(path, revision, cache_dir)
    return AutoencoderKL.from_pretrained(path, subfolder=subfolder, dtype=dtype, revision=revision, variant=variant,
                                         cache_dir=cache_dir)


def load_teacher(path, dtype, device, revision=None, variant=None, cache_dir=None, vae=None):
    """The teacher pipeline, frozen, on ``device``. ``vae``: a folder or hub id of an AutoencoderKL that
    replaces the pipeline's VAE (``--teacher_vae``; used only to decode for transcoding)."""
    from diffusers import AutoPipelineForText2Image

    components = {} if vae is None else {"vae": load_vae(vae, dtype, cache_dir=cache_dir)}
    pipeline = AutoPipelineForText2Image.from_pretrained(
        path, dtype=dtype, revision=revision, variant=variant, cache_dir=cache_dir, **components
    )
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        if getattr(pipeline, name, None) is not None:
            setattr(pipeline, name, None)
    pipeline.to(device)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    return pipeline


def load_teacher_latents(teacher, base, dtype, device, num_inference_steps=1, guidance_scale=0.0, transcode=False,
                         teacher_vae=None, revision=None, variant=None, cache_dir=None):
    """The latent source of a run: the teacher pipeline, plus a transcoder into ``base``'s latent space when
    ``transcode`` (the preflight's ``TeacherLatentPlan.transcode``). ``revision`` / ``variant`` are the base's."""
    from yoso.data.latent_space import load_latent_transcoder

    # Without transcoding the teacher's VAE is never run: --teacher_vae would load weights for nothing.
    pipeline = load_teacher(teacher, dtype, device, cache_dir=cache_dir, vae=teacher_vae if transcode else None)
    transcoder = None
    if transcode:
        transcoder = load_latent_transcoder(pipeline.vae, base, dtype, device, revision, variant, cache_dir)
    return TeacherLatents(pipeline, num_inference_steps, guidance_scale, transcoder)
