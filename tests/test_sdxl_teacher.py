"""A teacher in another latent space (issue 14.3): SDXL-Turbo-shaped teacher, latents transcoded into the base's.

The main claim is measured with VAEs whose round trips are meaningful (yoso.testing.make_blockwise_linear_vae:
exact linear codes on 8x8-block-constant images, and their decoders only make such images): the transcoded
latents, decoded by the base VAE, give the teacher's own images; the raw latents, and every plausible bug
(a missing scaling, the wrong VAE, no decode), do not.
"""

import argparse
import json
import shutil

import pytest
import torch

PROMPTS = ["a red fox in the snow", "an old lighthouse at dusk", "a bowl of ramen"]
SEEDS = [11, 12, 13]
SDXL_SCALING, SD_SCALING = 0.13025, 0.18215
# Latent = matrix @ rgb per 8x8 block. The teacher's is large because its raw latents are (~15 / 0.13025):
# its decoder (the pseudo-inverse) brings them to images mostly inside [-1, 1].
TEACHER_MATRIX = 250 * torch.tensor([[1.0, 0.2, -0.3], [0.1, 0.9, 0.4], [-0.2, 0.3, 1.1], [0.5, -0.5, 0.5]])
BASE_MATRIX = 3 * torch.tensor([[0.2, 1.0, 0.1], [1.0, -0.3, 0.2], [0.1, 0.4, -1.0], [0.6, 0.6, 0.6]])


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory):
    """Tiny SDXL-Turbo-shaped pipeline with a random VAE (scaling 0.13025)."""
    from yoso.testing import build_tiny_sdxl_turbo

    return build_tiny_sdxl_turbo(tmp_path_factory.mktemp("sdxl") / "sdxl_turbo")


@pytest.fixture(scope="module")
def linear_vaes(tmp_path_factory, tiny_base):
    """(teacher VAE folder, for --teacher_vae; base model folder whose vae/ is the base's linear VAE)."""
    from yoso.testing import make_blockwise_linear_vae

    root = tmp_path_factory.mktemp("linear")
    teacher_vae = root / "teacher_vae"
    make_blockwise_linear_vae(TEACHER_MATRIX, SDXL_SCALING).save_pretrained(teacher_vae)
    base = root / "base"
    shutil.copytree(tiny_base, base)
    shutil.rmtree(base / "vae")
    make_blockwise_linear_vae(BASE_MATRIX, SD_SCALING).save_pretrained(base / "vae")
    return str(teacher_vae), str(base)


def noise_for(source):
    from yoso.data.teacher import teacher_noise

    return teacher_noise(SEEDS, source.noise_shape(64), "cpu", torch.float32)


def teacher_images(source, noise):
    """The teacher's images as its own pipeline decodes and post-processes them, in [0, 1]."""
    return source.pipeline(prompt=PROMPTS, latents=noise, height=64, width=64, num_inference_steps=1,
                           guidance_scale=0.0, output_type="pt").images


def test_tiny_sdxl_turbo_loads_as_sdxl_and_is_conditioned_on_the_training_size(sdxl_teacher, tiny_base):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from yoso.data.latent_space import scale_latents
    from yoso.data.teacher import load_teacher_latents

    source = load_teacher_latents(sdxl_teacher, tiny_base, torch.float32, "cpu", transcode=True)
    pipe = source.pipeline
    assert type(pipe) is StableDiffusionXLPipeline  # through AutoPipelineForText2Image
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.scheduler.config.timestep_spacing == "trailing" and type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.vae.config.scaling_factor == SDXL_SCALING and pipe.vae.config.force_upcast is False
    assert source.noise_shape(64) == (4, 8, 8)

    noise = noise_for(source)
    raw = source.teacher_space_latents(PROMPTS, noise)
    call = dict(prompt=PROMPTS, latents=noise, num_inference_steps=1, guidance_scale=0.0, output_type="latent")
    assert torch.equal(raw, pipe(height=64, width=64, **call).images)
    # SDXL's size conditioning reaches the UNet: told 128 px, the same noise gives other latents.
    assert (raw - pipe(height=128, width=128, **call).images).abs().max() > 1e-2

    # With random VAEs a round trip means nothing, but the transcoded latents must still be the base VAE's
    # encoding (posterior mean, times its scaling factor) of exactly the images the teacher pipeline decodes.
    images = teacher_images(source, noise)
    base_vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    with torch.no_grad():
        expected = scale_latents(base_vae.encode(images * 2 - 1).latent_dist.mean, base_vae.config)
    transcoded = source(PROMPTS, noise)
    assert transcoded.shape == (3, 4, 8, 8)
    assert (transcoded - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_transcoded_latents_decode_to_the_teachers_images(sdxl_teacher, linear_vaes, monkeypatch):
    """--teacher_vae is the teacher's linear VAE, the base's VAE another linear one with another scaling."""
    from diffusers import AutoencoderKL

    from yoso.data import latent_space
    from yoso.data.latent_space import LatentTranscoder
    from yoso.data.teacher import load_teacher_latents

    teacher_vae, base = linear_vaes
    source = load_teacher_latents(sdxl_teacher, base, torch.float32, "cpu", transcode=True, teacher_vae=teacher_vae)
    # --teacher_vae replaced the pipeline's VAE (the linear VAE's blocks are (16,) * 4, the random one's are not).
    assert list(source.pipeline.vae.config.block_out_channels) == [16] * 4
    assert source.pipeline.vae.config.scaling_factor == SDXL_SCALING
    noise = noise_for(source)
    raw = source.teacher_space_latents(PROMPTS, noise)
    images = teacher_images(source, noise)  # decoded by --teacher_vae
    # A fair test image: mostly unclamped, with structure.
    assert ((images > 0.02) & (images < 0.98)).float().mean() > 0.6 and images.std() > 0.1

    base_vae = AutoencoderKL.from_pretrained(base, subfolder="vae")

    def error(latents):
        """Max pixel error between what the base VAE shows for ``latents`` and the teacher's images."""
        with torch.no_grad():
            shown = (base_vae.decode(latents / SD_SCALING).sample / 2 + 0.5).clamp(0, 1)
        return (shown - images).abs().max().item()

    assert error(source(PROMPTS, noise)) < 1e-3
    assert error(raw) > 0.3  # the teacher's raw latents mean other images to the base

    # Negative controls: each bug a transcoder could have, injected into the real code, is caught.
    def vae(path, subfolder=None):
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder)

    bugs = {"no decode, only rescaled": lambda: raw * SD_SCALING / SDXL_SCALING,
            "decoded by the base's VAE": lambda: LatentTranscoder(vae(base, "vae"), vae(base, "vae"), torch.float32)(raw),
            "decoded by the teacher pipeline's own VAE, --teacher_vae ignored":
                lambda: LatentTranscoder(vae(sdxl_teacher, "vae"), vae(base, "vae"), torch.float32)(raw)}
    errors = {name: error(bug()) for name, bug in bugs.items()}
    with monkeypatch.context() as patch:
        patch.setattr(latent_space, "unscale_latents", lambda latents, config: latents)
        errors["not divided by the teacher's scaling factor"] = error(source(PROMPTS, noise))
    with monkeypatch.context() as patch:
        patch.setattr(latent_space, "scale_latents", lambda latents, config: latents)
        errors["not multiplied by the base's scaling factor"] = error(source(PROMPTS, noise))
    assert all(e > 0.2 for e in errors.values()), errors  # (measured: 0.41 to 1.0; the transcoder's 2e-5)
    assert error(source(PROMPTS, noise)) < 1e-3  # the patches are gone


def test_scaling_conventions_match_diffusers_pipelines():
    """SDXL-style latents_mean/std, SD3/Flux-style shift_factor, plain scaling; each inverse of the other."""
    from diffusers.configuration_utils import FrozenDict

    from yoso.data.latent_space import scale_latents, unscale_latents

    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.0, 4.0]
    view = lambda v: torch.tensor(v).view(1, 4, 1, 1)  # noqa: E731
    configs = {
        # the formulas of StableDiffusionXLPipeline's and StableDiffusion3Pipeline's decode
        "mean/std": (FrozenDict(scaling_factor=0.5, latents_mean=mean, latents_std=std), x * view(std) / 0.5 + view(mean)),
        "shift": (FrozenDict(scaling_factor=1.5305, shift_factor=0.0609), x / 1.5305 + 0.0609),
        "plain": (FrozenDict(scaling_factor=SDXL_SCALING, shift_factor=None), x / SDXL_SCALING),
    }
    for name, (config, decoder_input) in configs.items():
        assert torch.allclose(unscale_latents(x, config), decoder_input, atol=1e-6), name
        assert torch.allclose(scale_latents(unscale_latents(x, config), config), x, atol=1e-5), name


def test_fp16_upcasts_vaes_that_ask_for_it_and_ignores_autocast():
    from yoso.data.latent_space import LatentTranscoder, vae_compute_dtype
    from yoso.testing import make_blockwise_linear_vae

    def vaes(force_upcast):
        made = make_blockwise_linear_vae(TEACHER_MATRIX, SDXL_SCALING), make_blockwise_linear_vae(BASE_MATRIX, SD_SCALING)
        for v in made:
            v.register_to_config(force_upcast=force_upcast)
        return made

    assert vae_compute_dtype({"force_upcast": True}, torch.float16) == torch.float32  # SDXL's VAE
    assert vae_compute_dtype({"force_upcast": False}, torch.float16) == torch.float16  # the fp16-fix VAE
    assert vae_compute_dtype({"force_upcast": True}, torch.bfloat16) == torch.bfloat16  # bf16 does not overflow
    upcast = LatentTranscoder(*vaes(True), torch.float16)
    assert upcast.teacher_vae.dtype == upcast.base_vae.dtype == torch.float32
    assert LatentTranscoder(*vaes(False), torch.float16).teacher_vae.dtype == torch.float16

    latents = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 15).half()
    plain = upcast(latents)
    assert plain.dtype == torch.float16
    # An fp16 autocast region (where the training step calls the teacher) must not run the upcast VAEs in fp16.
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(upcast(latents), plain)
        images_in_autocast = upcast.teacher_vae.decode(latents.float() / SDXL_SCALING).sample
    assert images_in_autocast.dtype == torch.float16  # (what autocast would have done to an unguarded decode)


def configs(path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from yoso.utils.model_configs import load_model_config

    return load_model_config("--x", path, "vae", AutoencoderKL), load_model_config("--x", path, "unet",
                                                                                    UNet2DConditionModel)


def test_plan_decides_from_configs_and_refuses_in_one_line(tiny_base, tiny_teacher, sdxl_teacher):
    from yoso.utils.model_configs import ArgumentError
    from yoso.data.latent_space import check_teacher_latents, latent_space_differences

    base_vae, base_unet = configs(tiny_base)
    turbo_vae, turbo_unet = configs(tiny_teacher)
    xl_vae, xl_unet = configs(sdxl_teacher)

    def plan(teacher_vae=xl_vae, teacher_unet=xl_unet, mode="auto", resolution=64, flag="--pretrained_teacher_model T"):
        return check_teacher_latents(base_vae, base_unet, teacher_vae, teacher_unet, resolution, mode, flag)

    # SD-Turbo-shaped: equal VAE configs (other random weights, as SD-Turbo's VAE config equals SD1.5's).
    assert latent_space_differences(base_vae, turbo_vae) == []
    assert not plan(turbo_vae, turbo_unet).transcode and plan(turbo_vae, turbo_unet, "always").transcode
    # SDXL-shaped: its scaling factor gives it away.
    assert latent_space_differences(base_vae, xl_vae) == ["scaling_factor 0.18215 vs 0.13025"]
    xl = plan()
    assert xl.transcode and xl.latent_shape == xl.teacher_latent_shape == (4, 8, 8)
    assert "scaling_factor 0.18215 vs 0.13025" in xl.reason
    forced = plan(mode="never")
    assert not forced.transcode and "although the VAE configs differ" in forced.reason
    # A 16-channel teacher (SD3-like VAE): transcoded; never is impossible.
    wide_vae, wide_unet = {**xl_vae, "latent_channels": 16}, {**xl_unet, "in_channels": 16, "out_channels": 16}
    wide = plan(wide_vae, wide_unet)
    assert wide.transcode and wide.teacher_latent_shape == (16, 8, 8) and wide.latent_shape == (4, 8, 8)

    refusals = {
        "never, other shape": (dict(teacher_vae=wide_vae, teacher_unet=wide_unet, mode="never"),
                               "--teacher_latent_transcode never: the teacher makes latents of 16 channels at 1/8 "
                               "resolution, the base UNet takes 4 at 1/8: use auto"),
        "inpainting UNet": (dict(teacher_unet={**xl_unet, "in_channels": 9}),
                            "--pretrained_teacher_model T: the VAE makes 4-channel latents, the teacher's UNet takes 9 "
                            "and returns 4: not a text-to-image teacher"),
        "VAE of another teacher": (dict(teacher_vae=wide_vae, flag="--teacher_vae V"),
                                   "--teacher_vae V: the VAE makes 16-channel latents, the teacher's UNet takes 4 and "
                                   "returns 4: give the VAE the teacher was trained with"),
        "no VAE": (dict(teacher_vae=None), "--pretrained_teacher_model T has no vae/"),
        "not an AutoencoderKL": (dict(teacher_vae={**xl_vae, "_class_name": "AutoencoderTiny"}),
                                 "its VAE is a AutoencoderTiny, not an AutoencoderKL"),
        # 48 px suits the base (multiple of 16) but not a teacher VAE that downsamples 16x (48 / 16 = 3 latents,
        # then 2 UNet downsamplings).
        "resolution": (dict(teacher_vae={**xl_vae, "block_out_channels": [8, 16, 16, 16, 16]}, resolution=48),
                       "--resolution 48: the teacher needs a multiple of 32"),
        "mode": (dict(mode="sometimes"), "--teacher_latent_transcode sometimes: choose one of auto, always, never"),
    }
    for name, (kwargs, expected) in refusals.items():
        with pytest.raises(ArgumentError) as error:
            plan(**kwargs)
        assert expected in str(error.value) and "\n" not in str(error.value), (name, str(error.value))


def test_plan_from_flags_reads_teacher_vae_folders(tiny_base, tiny_teacher, sdxl_teacher, linear_vaes):
    from yoso.utils.model_configs import ArgumentError
    from yoso.data.latent_space import teacher_latent_plan

    def args(teacher, **extra):
        return argparse.Namespace(pretrained_model_name_or_path=tiny_base, pretrained_teacher_model=teacher,
                                  cache_dir=None, resolution=64, **extra)

    assert teacher_latent_plan(args(sdxl_teacher)).transcode
    assert not teacher_latent_plan(args(tiny_teacher)).transcode  # no --teacher_vae / mode attributes: auto
    # --teacher_vae: a VAE folder (config.json at its root) or a pipeline folder (its vae/).
    assert teacher_latent_plan(args(tiny_teacher, teacher_vae=linear_vaes[0], teacher_latent_transcode="auto")).transcode
    assert teacher_latent_plan(args(tiny_teacher, teacher_vae=sdxl_teacher, teacher_latent_transcode="auto")).transcode
    assert not teacher_latent_plan(args(sdxl_teacher, teacher_vae=None, teacher_latent_transcode="never")).transcode
    with pytest.raises(ArgumentError, match=r"^--teacher_vae /nowhere/vae: no such folder"):
        teacher_latent_plan(args(sdxl_teacher, teacher_vae="/nowhere/vae", teacher_latent_transcode="auto"))


def test_train_script_transcodes_an_sdxl_teachers_latents(sdxl_teacher, tiny_base, tmp_path):
    """train_yoso_lora.py with the SDXL-Turbo-shaped teacher: the preflight decides to transcode, and the
    latents the step trained on (their statistics) are the transcoded teacher latents of the first batch."""
    from safetensors.torch import load_file

    from harness import launch, tiny_train_args, write_prompts
    from yoso.data.prompts import ShardedPromptSampler
    from yoso.data.latent_stats import LatentStats
    from yoso.data.teacher import load_teacher_latents, teacher_noise, teacher_noise_seeds

    prompts_file = write_prompts(tmp_path / "prompts.jsonl", n=8)
    outputs = {}
    for mode in ("auto", "never"):
        out = tmp_path / mode
        result = launch(tiny_train_args(tiny_base, sdxl_teacher, prompts_file, out, steps=1, report_to="none",
                                        teacher_latent_transcode=mode))
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("teacher latents:" in result.stderr) == (mode == "auto")
        outputs[mode] = load_file(out / "latent_stats.safetensors")

    prompts = [json.loads(line)["prompt"] for line in open(prompts_file)]
    _, _, indices = next(ShardedPromptSampler(8, 4, 1, 0, 0).batches())  # the run's first batch (seed 0)
    source = load_teacher_latents(sdxl_teacher, tiny_base, torch.float32, "cpu", transcode=True)
    noise = teacher_noise(teacher_noise_seeds(0, 0, indices), source.noise_shape(64), "cpu", torch.float32)
    expected = LatentStats((4, 8, 8))
    expected.update(source([prompts[i] for i in indices], noise))
    assert (outputs["auto"]["mean"] - expected.mean()).abs().max().item() <= 1e-5
    assert abs(outputs["auto"]["std"].item() - expected.std()) <= 1e-5
    # Without transcoding the run trains on the teacher's own latents, which differ.
    assert (outputs["never"]["mean"] - expected.mean()).abs().max().item() > 1e-2


def test_two_ancestral_teacher_steps_give_latents_that_depend_only_on_seed_epoch_and_index(sdxl_teacher, tiny_base,
                                                                                          tmp_path):
    """SDXL-Turbo's ancestral scheduler adds noise between steps: at 2 steps it must come from the samples' own
    seeds, not the global RNG, on every route (the training step's, the cache's), whatever the batch."""
    from types import SimpleNamespace

    from yoso.data.latent_cache import LatentCacheReader, make_cache_settings, precompute_latents, write_cache_info
    from yoso.method.step import YOSOTrainingStep
    from yoso.data.teacher import load_teacher_latents, teacher_noise, teacher_noise_seeds

    source = load_teacher_latents(sdxl_teacher, tiny_base, torch.float32, "cpu", num_inference_steps=2,
                                  transcode=True)
    assert type(source.pipeline.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    prompts = [f"prompt number {i}" for i in range(5)]
    shape = source.noise_shape(64)

    def step_latents(indices, global_seed, epoch=1):
        """The training step's own path (YOSOTrainingStep.latents) with the global RNG seeded differently."""
        torch.manual_seed(global_seed)
        fake_step = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), seed=7,
                                    teacher_noise_shape=shape, latent_source=source)
        batch = {"epoch": epoch, "indices": indices, "prompts": [prompts[i] for i in indices]}
        return YOSOTrainingStep.latents(fake_step, batch, SimpleNamespace(dtype=torch.float32))

    a = step_latents([0, 1, 2], global_seed=0)
    b = step_latents([4, 2], global_seed=12345)
    assert (a[2] - b[1]).abs().max() <= 1e-5 * a[2].abs().max()  # index 2: same latent in another batch and RNG
    assert (a[0] - step_latents([0], global_seed=99)[0]).abs().max() <= 1e-5 * a[0].abs().max()
    # The steps' noise matters (so the equalities above are not vacuous): other step seeds, other latents ...
    seeds = teacher_noise_seeds(7, 1, [2])
    noise = teacher_noise(seeds, shape, "cpu", torch.float32)
    other = source([prompts[2]], noise, [seeds[0] + 1])
    assert (other[0] - a[2]).abs().max() > 1e-2 * a[2].abs().max()
    # ... and so does the epoch.
    assert (step_latents([2], global_seed=0, epoch=2)[0] - a[2]).abs().max() > 1e-2 * a[2].abs().max()

    # The cache (batches of 2 here) holds the latents the training step makes (batches of 3 above).
    settings = make_cache_settings(sdxl_teacher, 64, (4, 8, 8), 2, 0.0, 7, prompts)
    torch.manual_seed(555)
    precompute_latents(tmp_path / "cache", source, prompts, settings, num_epochs=2, shard_size=4, batch_size=2)
    write_cache_info(tmp_path / "cache", settings, 2, 4, 2, torch.float32, torch.float32)
    cached = LatentCacheReader(tmp_path / "cache").latents(1, [0, 1, 2])
    assert (cached - a).abs().max() <= 1e-5 * a.abs().max()
