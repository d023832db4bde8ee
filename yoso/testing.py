"""Tiny Stable-Diffusion-1.5- and SD-Turbo-shaped pipelines, built offline with random weights.

There is no model hub in tests or CI, so every test and the demo run on these. They are saved in the
standard diffusers folder layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) and load with ``DiffusionPipeline.from_pretrained`` exactly like the
real models, so the training script's real loading code is what gets tested.

The tokenizer is the real CLIP BPE tokenizer (the one SD1.5 uses), rebuilt from the BPE merge list that
``open_clip_torch`` ships, so token ids match SD1.5's.

Command line::

    python -m yoso.testing --output_dir tiny_models            # writes tiny_models/{sd15,teacher}
    python -m yoso.testing --output_dir tiny_models --resolution 128
"""

import argparse
import json
import os
from pathlib import Path

import torch

# SD1.5's scheduler/scheduler_config.json (a PNDM over the DDPM "scaled_linear" training schedule).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

# SD-Turbo's scheduler: Euler with trailing timestep spacing, so 1 step starts at t = 999.
TURBO_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "use_karras_sigmas": False,
    "trained_betas": None,
}

# SD1.5's CLIP tokenizer lives in production code (the JourneyDB token counter uses it too); the tiny
# models take it from there.
from yoso.clip_bpe import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_bpe_vocab, make_clip_tokenizer


def write_clip_vocab_files(folder):
    """Add ``vocab.json`` and ``merges.txt`` beside ``tokenizer.json``, as in SD1.5's ``tokenizer/`` folder."""
    vocab, merges = clip_bpe_vocab()
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")


def _text_encoder(hidden_size, seed, num_layers=2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(config).eval()


def make_vae(seed, sample_size, block_out_channels=(8, 16, 16, 16), scaling_factor=0.18215):
    """An SD-shaped AutoencoderKL with random weights: four encoder blocks -> three downsamplings -> SD's
    scale factor 8, and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=block_out_channels[0],
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    ).eval()


def _unet(seed, sample_size, block_out_channels, cross_attention_dim, linear_projection=False, layers_per_block=1):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    # SD1.5's pattern: cross-attention in every block but the lowest, which is a plain resnet block.
    down = tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=linear_projection,
    ).eval()


def build_tiny_sd15(path, resolution=64, block_out_channels=(32, 64), text_hidden_size=32, seed=0):
    """Save a tiny SD1.5-shaped StableDiffusionPipeline (epsilon prediction) to ``path``; return the path."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    latent = resolution // 8
    pipe = StableDiffusionPipeline(
        vae=make_vae(seed + 1, resolution),
        text_encoder=_text_encoder(text_hidden_size, seed + 2),
        tokenizer=make_clip_tokenizer(),
        unet=_unet(seed + 3, latent, block_out_channels, text_hidden_size),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    write_clip_vocab_files(Path(path) / "tokenizer")
    return str(path)


def build_tiny_teacher(path, resolution=64, block_out_channels=(32, 64), text_hidden_size=48, seed=100):
    """Save a tiny SD-Turbo-shaped pipeline: the SD latent space, a wider text encoder (as SD-Turbo's
    OpenCLIP is wider than SD1.5's CLIP), linear attention projections, Euler with trailing spacing."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    latent = resolution // 8
    pipe = StableDiffusionPipeline(
        vae=make_vae(seed + 1, resolution),
        text_encoder=_text_encoder(text_hidden_size, seed + 2),
        tokenizer=make_clip_tokenizer(pad_token="!"),
        unet=_unet(seed + 3, latent, block_out_channels, text_hidden_size, linear_projection=True),
        scheduler=EulerDiscreteScheduler.from_config(TURBO_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    write_clip_vocab_files(Path(path) / "tokenizer")
    return str(path)


def build_tiny_models(output_dir, resolution=64):
    """Build both tiny pipelines under ``output_dir``; return ``(base_path, teacher_path)``."""
    output_dir = Path(output_dir)
    base = build_tiny_sd15(output_dir / "sd15", resolution=resolution)
    teacher = build_tiny_teacher(output_dir / "teacher", resolution=resolution)
    return base, teacher


def sample_journeydb_records(n=64, seed=0):
    """JourneyDB-shaped annotation records with raw Midjourney prompts, for the demo and tests."""
    import random

    rng = random.Random(seed)
    subjects = ["a red fox", "an old lighthouse", "a bowl of ramen", "a cyberpunk street", "a snowy mountain",
                "a portrait of a knight", "a tiny robot", "a field of sunflowers", "a koi pond", "a desert caravan"]
    styles = ["oil painting", "studio photo", "watercolor", "3d render", "pencil sketch", "cinematic lighting"]
    params = ["--ar 16:9", "--v 5.2", "--q 2 --s 750", "--niji 5 --style raw", "--chaos 20", "", "--ar 2:3 --v 5"]
    records = []
    for i in range(n):
        prompt = f"{rng.choice(subjects)}, {rng.choice(styles)} {rng.choice(params)}".strip()
        if i % 7 == 0:
            prompt = f"https://s.mj.run/abc{i} {prompt}"
        records.append({
            "img_path": f"./{i:03d}/{i:06d}.jpg",
            "prompt": prompt,
            "Task1": {"Style": [rng.choice(styles)], "Content": ["scene"]},
            "Task2": {"Caption": f"An image of {prompt.split(',')[0]}."},
            "Task3": {"Questions": ["What is shown?"], "Options": [["A", "B"]], "Answers": ["A"]},
        })
    return records


def write_sample_journeydb_archive(path, n=64, seed=0):
    """A ``train_anno.jsonl.tgz`` shaped like JourneyDB's: one JSON Lines member of annotation records."""
    import io
    import tarfile

    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_journeydb_records(n, seed)).encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        member = tarfile.TarInfo("train_anno.jsonl")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    return path


def main():
    parser = argparse.ArgumentParser(description="Build tiny offline SD1.5 and SD-Turbo-shaped pipelines.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--sample_annotations", default=None, metavar="PATH",
                        help="also write a JourneyDB-shaped train_anno.jsonl.tgz of sample records here")
    args = parser.parse_args()
    base, teacher = build_tiny_models(args.output_dir, resolution=args.resolution)
    print(f"tiny SD1.5-shaped base: {base}\ntiny SD-Turbo-shaped teacher: {teacher}")
    if args.sample_annotations:
        print(f"sample JourneyDB annotations: {write_sample_journeydb_archive(args.sample_annotations)}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
