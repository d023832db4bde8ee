"""One image-caption sample on its way to a latent: decode, caption, resize/crop/flip, VAE encode.

Every random choice of a sample (crop offsets, flip, which of a list of captions, the VAE posterior's
noise) comes from a generator seeded by (seed, epoch, sample id), so it does not depend on the batch
the sample lands in, the number of processes, the device, or where a run was resumed.
"""

import hashlib
import io

import numpy as np
import torch

from yoso.data.tar_shards import UnreadableSample

EXIF_ORIENTATION = 0x0112


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------------
# Randomness per sample
# --------------------------------------------------------------------------------------------------

def sample_seed(seed, epoch, sample_id, purpose):
    """A 63-bit seed for one use (``"augment"``, ``"caption"``, ``"vae"``) of one sample in one epoch."""
    digest = hashlib.blake2b(f"yoso-image/{purpose}/{int(seed)}/{int(epoch)}/{int(sample_id)}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def sample_generator(seed, epoch, sample_id, purpose):
    return torch.Generator().manual_seed(sample_seed(seed, epoch, sample_id, purpose))


def latent_generators(seed, epoch, ids):
    """The VAE-sampling generators of a batch: one per sample, from (seed, epoch, id)."""
    return [sample_generator(seed, epoch, i, "vae") for i in ids]


# --------------------------------------------------------------------------------------------------
# Pixels: decode, resize, crop, flip, scale
# --------------------------------------------------------------------------------------------------

def decode_image(data, name):
    """An RGB PIL image from bytes, a path, a datasets ``{"bytes", "path"}`` dict or a PIL image; EXIF
    orientation applied (as datasets' Image feature does). Anything undecodable -> UnreadableSample."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        if isinstance(data, dict):
            data = data.get("bytes") or data.get("path")
        if isinstance(data, Image.Image):
            image = data
        elif data is None:
            raise ValueError("no image data")
        else:
            source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
            with Image.open(source) as opened:
                opened.load()  # decode now: a truncated file fails here, inside the try
                if opened.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    return ImageOps.exif_transpose(opened).convert("RGB")
                return opened.convert("RGB")
        return image.convert("RGB")
    except Exception as error:  # PIL raises many types for bad input (OSError, SyntaxError, ValueError, ...)
        if isinstance(error, UnidentifiedImageError):  # its message holds an object repr, not a file name
            raise UnreadableSample(name, "not an image format PIL can decode") from None
        raise UnreadableSample(name, f"{type(error).__name__}: {first_line(error)}") from None


def caption_text(value, generator, name):
    """A caption string: text as is, one of a list of texts (chosen by ``generator``), bytes as UTF-8."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise UnreadableSample(name, "caption is not UTF-8 text") from None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        value = value[int(torch.randint(len(value), (1,), generator=generator))]
    if not isinstance(value, str):
        raise UnreadableSample(name, f"caption is {type(value).__name__}, not text")
    return value.strip()


def resized_size(width, height, resolution):
    """Shorter side to ``resolution``, aspect kept, the longer side truncated (torchvision's Resize(int))."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def crop_and_flip(width, height, resolution, center_crop, random_flip, generator):
    """(top, left, flip) for a ``width`` x ``height`` image. Three uniforms are always drawn, so each
    decision is the same whatever the other flags are."""
    u_top, u_left, u_flip = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    if center_crop:  # torchvision's CenterCrop offsets
        top, left = int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    else:
        top, left = int(u_top * (height - resolution + 1)), int(u_left * (width - resolution + 1))
    return top, left, bool(random_flip and u_flip < 0.5)


def preprocess_image(image, resolution, center_crop, random_flip, generator):
    """diffusers' train_text_to_image transform: bilinear resize of the shorter side to ``resolution``,
    center or random crop, optional horizontal flip, to a float32 [3, res, res] tensor in [-1, 1]."""
    from PIL import Image

    width, height = resized_size(*image.size, resolution)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.BILINEAR)
    top, left, flip = crop_and_flip(width, height, resolution, center_crop, random_flip, generator)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
    return pixels.div(255.0).sub(0.5).div(0.5)  # ToTensor then Normalize([0.5], [0.5]), in that order


# --------------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_images(vae, pixel_values, generators):
    """Latents in the base model's scaled space, float32 [B, C, res/8, res/8]: the posterior's
    ``mean + std * noise`` (what ``latent_dist.sample`` computes), times ``scaling_factor``.

    ``generators`` holds one CPU generator per sample (``latent_generators``). The noise is drawn in
    float32 on the CPU, not by ``sample()``, which would draw it in the VAE's dtype on its device (and log a
    line per call for CPU generators on a GPU): so a sample's noise is the same on any device and precision.
    """
    generators = list(generators)
    if len(generators) != pixel_values.shape[0]:
        raise ValueError(f"{len(generators)} generators for {pixel_values.shape[0]} images")
    weight = next(vae.parameters())
    distribution = vae.encode(pixel_values.to(weight.device, weight.dtype)).latent_dist
    mean, std = distribution.mean.float(), distribution.std.float()
    noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g, dtype=torch.float32) for g in generators])
    latents = mean + std * noise.to(mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # Contiguous: the VAE's kernels may hand back another memory layout (channels-last on CPU), and the UNet's
    # convolutions would then round differently than for the same x0 read from a latent cache.
    return ((latents - shift) * vae.config.scaling_factor).contiguous()
