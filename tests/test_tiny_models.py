"""The offline tiny models: real loading code paths, real tokenizer ids, finite outputs."""

import json
from pathlib import Path

import torch

SD15_CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_folder_layout(tiny_base, tiny_teacher):
    for path in (tiny_base, tiny_teacher):
        index = json.loads((Path(path) / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionPipeline"
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert (Path(path) / sub).is_dir(), sub
        assert (Path(path) / "tokenizer" / "vocab.json").is_file()
        assert (Path(path) / "tokenizer" / "merges.txt").is_file()
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        assert size < 30e6, size


def test_tokenizer_matches_sd15_ids(tiny_base):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")
    assert tokenizer("a photo of a cat").input_ids == SD15_CAT_IDS
    assert tokenizer.model_max_length == 77
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70


def test_base_pipeline_loads_and_generates(tiny_base):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_base)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.config.in_channels == 4 and pipe.vae.config.latent_channels == 4
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a cat", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(images)).all()


def test_teacher_loads_with_autopipeline_and_makes_latents(tiny_teacher, tiny_base):
    from diffusers import AutoPipelineForText2Image, EulerDiscreteScheduler
    from transformers import CLIPTextModel

    teacher = AutoPipelineForText2Image.from_pretrained(tiny_teacher)
    assert isinstance(teacher.scheduler, EulerDiscreteScheduler)
    assert teacher.scheduler.config.timestep_spacing == "trailing"
    assert teacher.tokenizer.pad_token == "!"
    base_text = CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder")
    assert teacher.text_encoder.config.hidden_size != base_text.config.hidden_size
    teacher.set_progress_bar_config(disable=True)
    teacher.scheduler.set_timesteps(1)
    assert teacher.scheduler.timesteps.tolist() == [999]
    latents = teacher(["a cat", "a dog"], num_inference_steps=1, guidance_scale=0.0, output_type="latent",
                      latents=torch.randn(2, 4, 8, 8, generator=torch.manual_seed(0))).images
    assert latents.shape == (2, 4, 8, 8)
    assert torch.isfinite(latents).all()


def test_resolution_is_configurable(tmp_path):
    from diffusers import UNet2DConditionModel

    from yoso.testing import build_tiny_sd15

    path = build_tiny_sd15(tmp_path / "sd15_128", resolution=128)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    assert unet.config.sample_size == 16
