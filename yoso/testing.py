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
from yoso.data.clip_bpe import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_bpe_vocab, make_clip_tokenizer


def write_clip_vocab_files(folder):
    """Add ``vocab.json`` and ``merges.txt`` beside ``tokenizer.json``, as in SD1.5's ``tokenizer/`` folder."""
    vocab, merges = clip_bpe_vocab()
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")


def _clip_text_config(hidden_size, projection_dim, num_layers):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection_dim,
    )


def _text_encoder(hidden_size, seed, num_layers=2):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(_clip_text_config(hidden_size, hidden_size, num_layers)).eval()


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


# ---- a tiny SDXL-Turbo-shaped teacher (another latent space) -------------------------------------------

SDXL_VAE_SCALING_FACTOR = 0.13025


def _text_encoder_with_projection(hidden_size, projection_dim, seed, num_layers=2):
    """SDXL's second text encoder shape: a CLIP text model whose pooled output is projected (the pooled
    embedding SDXL conditions on)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_clip_text_config(hidden_size, projection_dim, num_layers)).eval()


# SDXL-Turbo's scheduler (stabilityai/sdxl-turbo scheduler/scheduler_config.json): *ancestral* Euler with
# trailing spacing; it adds fresh noise between steps, so more than one step needs the caller's generators.
SDXL_TURBO_SCHEDULER_CONFIG = {**TURBO_SCHEDULER_CONFIG, "_class_name": "EulerAncestralDiscreteScheduler"}


def build_tiny_sdxl_turbo(path, resolution=64, block_out_channels=(32, 64), text_hidden_sizes=(32, 48),
                          projection_dim=32, time_embed_dim=8, seed=200, vae=None):
    """Save a tiny SDXL-Turbo-shaped StableDiffusionXLPipeline to ``path``; return the path.

    Two text encoders (CLIPTextModel, and CLIPTextModelWithProjection for the pooled embedding, with the
    SD2-style "!" padding tokenizer), a UNet with SDXL's ``text_time`` added conditioning (pooled text +
    6 size numbers: original size, crop corner, target size), ancestral Euler with trailing spacing as
    SDXL-Turbo's scheduler, and a VAE in *another* latent space than the tiny SD1.5's: scaling factor 0.13025 (SDXL's),
    other weights, ``force_upcast`` false. ``vae``: an AutoencoderKL to use instead (e.g. from
    :func:`make_blockwise_linear_vae`).
    """
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    if vae is None:
        vae = make_vae(seed + 1, resolution, scaling_factor=SDXL_VAE_SCALING_FACTOR)
        vae.register_to_config(force_upcast=False)
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        # SDXL's pattern: no attention in the highest-resolution block.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        cross_attention_dim=sum(text_hidden_sizes),  # the two encoders' hidden states, concatenated
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=_text_encoder(text_hidden_sizes[0], seed + 2),
        text_encoder_2=_text_encoder_with_projection(text_hidden_sizes[1], projection_dim, seed + 4),
        tokenizer=make_clip_tokenizer(),
        tokenizer_2=make_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(SDXL_TURBO_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        write_clip_vocab_files(Path(path) / folder)
    return str(path)


def make_blockwise_linear_vae(encode_matrix, scaling_factor=0.18215, sample_size=64, channels=16, offset=30.0,
                              big=1000.0):
    """An AutoencoderKL (SD's layout: 3 downsamplings, 4 latent channels) whose weights are set so that, on
    images constant over aligned 8x8 blocks, it is an exact linear code: the latent of a block is
    ``encode_matrix @ rgb`` (a 4x3 matrix of rank 3) and the decoder maps it back by the pseudo-inverse.
    Round trips of random tiny VAEs are far from the identity; this one's are the identity to ~1e-5, and
    every image its decoder makes is block-constant, so a test can tell one latent space from another.

    How: resnets and attention are residual with their last layer zeroed (identities); the 2x downsamplers
    pick the top-left pixel, the upsamplers are nearest-neighbour. The final GroupNorms would erase each
    image's scale, so each signal channel ``s`` shares its group with ``-s``, ``+big`` and ``-big``: the group
    mean is exactly 0 and its std ``big / sqrt(2)`` up to a relative ``mean(s^2) / big^2``, which the norm's
    affine weight undoes; its bias ``offset`` keeps the SiLU after it in its linear range (|s| << offset).
    """
    from diffusers import AutoencoderKL

    encode = torch.as_tensor(encode_matrix, dtype=torch.float64)
    assert encode.shape == (4, 3) and torch.linalg.matrix_rank(encode) == 3, "encode_matrix: a 4x3 matrix of rank 3"
    decode = torch.linalg.pinv(encode)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(channels,) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=channels // 4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        force_upcast=False,
    ).eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for name, module in vae.named_modules():
            if name.endswith(("downsamplers.0.conv", "upsamplers.0.conv")):
                tap = 0 if "down" in name else 1  # top-left pixel of the padded 3x3 window / its centre
                for c in range(channels):
                    module.weight[c, c, tap, tap] = 1.0

        def write_signal(conv, matrix, bias=None):
            """conv's centre tap writes ``matrix @ input`` into channels 4g (group g) and its negation into
            4g+1, and +-big into 4g+2, 4g+3 (every group: also the one without a signal)."""
            for g in range(matrix.shape[0]):
                conv.weight[4 * g, :, 1, 1] = matrix[g].float()
                conv.weight[4 * g + 1, :, 1, 1] = -matrix[g].float()
                if bias is not None:
                    conv.bias[4 * g] = bias[g]
                    conv.bias[4 * g + 1] = -bias[g]
            for g in range(channels // 4):
                conv.bias[4 * g + 2], conv.bias[4 * g + 3] = big, -big

        def undo_norm(norm):
            for g in range(channels // 4):
                norm.weight[4 * g] = big / 2**0.5
                norm.bias[4 * g] = offset

        write_signal(vae.encoder.conv_in, torch.eye(3))
        undo_norm(vae.encoder.conv_norm_out)
        for latent in range(4):  # mean = encode @ (silu(s + offset) - offset); logvar = -30 (std 3e-7)
            for g in range(3):
                vae.encoder.conv_out.weight[latent, 4 * g, 1, 1] = float(encode[latent, g])
            vae.encoder.conv_out.bias[latent] = -offset * float(encode[latent].sum())
            vae.encoder.conv_out.bias[4 + latent] = -30.0
        write_signal(vae.decoder.conv_in, decode)
        undo_norm(vae.decoder.conv_norm_out)
        for g in range(3):
            vae.decoder.conv_out.weight[g, 4 * g, 1, 1] = 1.0
            vae.decoder.conv_out.bias[g] = -offset
        for conv in (vae.quant_conv, vae.post_quant_conv):
            for c in range(conv.weight.shape[0]):
                conv.weight[c, c, 0, 0] = 1.0
    return vae


def main():
    parser = argparse.ArgumentParser(description="Build tiny offline SD1.5 and SD-Turbo-shaped pipelines.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--sample_annotations", default=None, metavar="PATH",
                        help="also write a JourneyDB-shaped train_anno.jsonl.tgz of sample records here")
    args = parser.parse_args()
    from yoso.utils.library_noise import quiet_library_notices

    quiet_library_notices()
    base, teacher = build_tiny_models(args.output_dir, resolution=args.resolution)
    print(f"tiny SD1.5-shaped base: {base}\ntiny SD-Turbo-shaped teacher: {teacher}")
    if args.sample_annotations:
        print(f"sample JourneyDB annotations: {write_sample_journeydb_archive(args.sample_annotations)}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
