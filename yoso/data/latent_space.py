"""Latent spaces: which VAE space a teacher's latents live in, and moving them into the base model's.

A teacher pipeline called with ``output_type="latent"`` returns latents in its own VAE's scaled space.
SD-Turbo shares SD1.5's (same autoencoder family, same scaling), so its latents train the base as they
are. SDXL-Turbo's live in the SDXL VAE's space (other weights, scaling factor 0.13025): fed to an SD1.5
UNet as they are, they are another distribution that merely has the right shape. Such latents are
*transcoded*: decoded to images by the teacher's VAE, then encoded by the base VAE (SPEC section 7b).

Whether two VAEs share a latent space is decided from their configs alone (no weights are read):
any difference in architecture, latent channels, scaling or shift means another space. Equal configs
cannot prove equal weights (SD-Turbo's VAE config equals SD1.5's and so does a fine-tuned VAE's), so
equal configs are taken as the same space and ``--teacher_latent_transcode always`` forces the round
trip; ``never`` forces raw latents.

Conventions (as in diffusers' pipelines): a VAE's *scaled* latent ``x`` and its raw latent ``z`` are related by
``x = (z - shift) * scaling_factor`` (``shift_factor``, SD3/Flux-style), or, when the config has
``latents_mean`` / ``latents_std`` (SDXL pipelines' convention), ``x = (z - mean) * scaling_factor / std``.
"""

import inspect
from dataclasses import dataclass

import torch

from yoso.utils.model_configs import ArgumentError, check_resolution, hub_unreachable, load_model_config
from yoso.utils.precision import place

TRANSCODE_MODES = ("auto", "always", "never")

# Config keys that define what a latent means. sample_size (a default image size) and force_upcast
# (a numerics hint) do not; the fp16-fix SDXL VAE differs from SDXL's only there.
LATENT_SPACE_KEYS = (
    "latent_channels", "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
    "in_channels", "out_channels", "norm_num_groups", "act_fn", "scaling_factor", "shift_factor",
    "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
)


# ---- config-only checks -------------------------------------------------------------------------------


def _autoencoder_kl_defaults():
    from diffusers import AutoencoderKL

    return {name: p.default for name, p in inspect.signature(AutoencoderKL.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _normalised(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def vae_latent_space(vae_config):
    """The latent-space-defining values of an AutoencoderKL config dict (missing keys take diffusers' defaults)."""
    defaults = _autoencoder_kl_defaults()
    return {key: _normalised(vae_config.get(key, defaults.get(key))) for key in LATENT_SPACE_KEYS}


def latent_space_differences(base_vae_config, teacher_vae_config):
    """``["scaling_factor 0.18215 vs 0.13025", ...]``: where two VAE configs define different latent spaces."""
    base, teacher = vae_latent_space(base_vae_config), vae_latent_space(teacher_vae_config)
    return [f"{key} {_show(base[key])} vs {_show(teacher[key])}" for key in LATENT_SPACE_KEYS if base[key] != teacher[key]]


def _show(value):
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


def vae_downsampling(vae_config):
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


@dataclass(frozen=True)
class TeacherLatentPlan:
    """What the preflight decided: ``transcode`` or not, the teacher's latent (and noise) shape, the shape
    training sees (the base's), and one line for the log saying why."""

    transcode: bool
    teacher_latent_shape: tuple
    latent_shape: tuple
    reason: str


def check_teacher_latents(base_vae, base_unet, teacher_vae, teacher_unet, resolution, transcode="auto",
                          teacher_vae_flag="--pretrained_teacher_model", base_flag="--pretrained_model_name_or_path"):
    """Decide, from config dicts only, how the teacher's latents reach the base's latent space.

    ``teacher_vae`` is the config of the VAE the teacher's latents are decoded with (``--teacher_vae`` if
    given, else the teacher's ``vae/``; None if it has none); ``teacher_vae_flag`` and ``base_flag`` name
    where the configs came from (flag and value), for the messages. Returns a :class:`TeacherLatentPlan`;
    a teacher whose latents cannot reach the base (no VAE, not an image autoencoder, channel or resolution
    mismatch) is a one-line ArgumentError.
    """

    if transcode not in TRANSCODE_MODES:
        raise ArgumentError(f"--teacher_latent_transcode {transcode}: choose one of {', '.join(TRANSCODE_MODES)}")
    if teacher_vae is None:
        raise ArgumentError(f"{teacher_vae_flag} has no vae/: its latents cannot be decoded or placed; give the "
                              "VAE it was trained with as --teacher_vae (a folder or hub id of an AutoencoderKL)")
    for flag, config in ((teacher_vae_flag, teacher_vae), (base_flag, base_vae)):
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ArgumentError(f"{flag}: its VAE is a {name}, not an AutoencoderKL image autoencoder; only "
                                  "AutoencoderKL latent spaces can be decoded and re-encoded here")
    channels = teacher_vae["latent_channels"]
    unet_channels = (teacher_unet["in_channels"], teacher_unet.get("out_channels", teacher_unet["in_channels"]))
    if unet_channels != (channels, channels):
        fix = "give the VAE the teacher was trained with" if teacher_vae_flag.startswith("--teacher_vae") else \
            "not a text-to-image teacher (an inpainting or otherwise conditioned UNet)"
        raise ArgumentError(f"{teacher_vae_flag}: the VAE makes {channels}-channel latents, the teacher's UNet takes "
                              f"{unet_channels[0]} and returns {unet_channels[1]}: {fix}")
    if base_vae["latent_channels"] != base_unet["in_channels"]:
        raise ArgumentError(f"{base_flag}: its VAE makes {base_vae['latent_channels']}-channel latents, its UNet "
                              f"takes {base_unet['in_channels']}: not a text-to-image model")
    check_resolution(resolution, base_vae, base_unet)
    check_resolution(resolution, teacher_vae, teacher_unet, which="the teacher")

    base_factor, teacher_factor = vae_downsampling(base_vae), vae_downsampling(teacher_vae)
    latent_shape = (base_unet["in_channels"], resolution // base_factor, resolution // base_factor)
    teacher_shape = (channels, resolution // teacher_factor, resolution // teacher_factor)
    differences = latent_space_differences(base_vae, teacher_vae)
    unused_vae = ", so --teacher_vae is not used" if teacher_vae_flag.startswith("--teacher_vae") else ""
    if transcode == "never":
        if teacher_shape != latent_shape:
            raise ArgumentError(
                f"--teacher_latent_transcode never: the teacher makes latents of {teacher_shape[0]} channels at 1/"
                f"{teacher_factor} resolution, the base UNet takes {latent_shape[0]} at 1/{base_factor}: use auto "
                "(decode by the teacher's VAE, encode by the base's)")
        reason = "teacher latents used as they are (--teacher_latent_transcode never)"
        if differences:
            reason += f", although the VAE configs differ ({'; '.join(differences)})"
        return TeacherLatentPlan(False, teacher_shape, latent_shape, reason + unused_vae)
    if transcode == "always" or differences:
        why = "--teacher_latent_transcode always" if not differences else \
            f"the VAE configs differ: base vs teacher {'; '.join(differences)}"
        return TeacherLatentPlan(True, teacher_shape, latent_shape,
                                 f"teacher latents are decoded by the teacher's VAE and re-encoded by the base's ({why})")
    return TeacherLatentPlan(False, teacher_shape, latent_shape,
                             "teacher and base VAE configs are equal: the teacher's latents are used as they are "
                             f"(--teacher_latent_transcode always forces the decode/encode round trip){unused_vae}")


def load_vae_config(flag, path, revision=None, cache_dir=None):
    """The config of an AutoencoderKL at ``path``: a VAE folder / hub id (config.json at its root) or a
    pipeline folder / hub id (``vae/config.json``). One-line ArgumentError naming ``flag`` otherwise."""
    from diffusers import AutoencoderKL


    subfolder = vae_subfolder(path, revision, cache_dir) or ""
    return load_model_config(flag, path, subfolder, AutoencoderKL, revision=revision, cache_dir=cache_dir)


def vae_subfolder(path, revision=None, cache_dir=None):
    """None when ``path`` holds a VAE at its root, "vae" when it is a pipeline with a ``vae/`` folder."""
    import os
    import warnings

    from diffusers import AutoencoderKL

    local = os.path.expanduser(str(path))
    if os.path.isdir(local):
        return None if os.path.isfile(os.path.join(local, "config.json")) else "vae"
    from huggingface_hub import constants

    # The Hub cache first; the Hub itself only when it answers (its client retries for half a minute offline).
    for local_files_only in (True, False):
        if not local_files_only and (constants.HF_HUB_OFFLINE or hub_unreachable()):
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                AutoencoderKL.load_config(str(path), revision=revision, cache_dir=cache_dir,
                                          local_files_only=local_files_only)
            return None
        except Exception:  # no root config.json there: try the next place
            continue
    return "vae"  # the pipeline layout; load_model_config then reports why it cannot be read, in one line


def teacher_latent_plan(args):
    """Read the base's and the teacher's configs (a few KB, no weights) and check the teacher's latents
    (see :func:`check_teacher_latents`). ``args``: train_yoso_lora.py's or precompute_teacher_latents.py's,
    with ``--teacher_vae`` and ``--teacher_latent_transcode`` (missing attributes mean None and auto)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel


    base, teacher = args.pretrained_model_name_or_path, args.pretrained_teacher_model
    teacher_vae_path = getattr(args, "teacher_vae", None)
    transcode = getattr(args, "teacher_latent_transcode", None) or "auto"
    common = {"revision": getattr(args, "revision", None), "cache_dir": args.cache_dir}
    base_unet = load_model_config("--pretrained_model_name_or_path", base, "unet", UNet2DConditionModel, **common)
    base_vae = load_model_config("--pretrained_model_name_or_path", base, "vae", AutoencoderKL, **common)
    teacher_unet = load_model_config("--pretrained_teacher_model", teacher, "unet", UNet2DConditionModel,
                                     cache_dir=args.cache_dir)
    if teacher_vae_path:
        flag = f"--teacher_vae {teacher_vae_path}"
        teacher_vae = load_vae_config("--teacher_vae", teacher_vae_path, cache_dir=args.cache_dir)
    else:
        flag = f"--pretrained_teacher_model {teacher}"
        teacher_vae = _optional_vae_config(teacher, args.cache_dir)
    return check_teacher_latents(base_vae, base_unet, teacher_vae, teacher_unet, args.resolution, transcode, flag,
                                 f"--pretrained_model_name_or_path {base}")


def _optional_vae_config(teacher, cache_dir):
    """The teacher's vae/ config, or None when the pipeline has none (a local folder without vae/)."""
    import os

    from diffusers import AutoencoderKL


    local = os.path.expanduser(str(teacher))
    if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "vae", "config.json")):
        return None
    return load_model_config("--pretrained_teacher_model", teacher, "vae", AutoencoderKL, cache_dir=cache_dir)


# ---- the transcoding itself ---------------------------------------------------------------------------


def _channel_vector(values, like):
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)


def unscale_latents(latents, vae_config):
    """A VAE's scaled latents (what pipelines return with ``output_type="latent"``) -> its raw latents, the
    decoder's input (the inverse of :func:`scale_latents`)."""
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        return latents * _channel_vector(std, latents) / vae_config["scaling_factor"] + _channel_vector(mean, latents)
    return latents / vae_config["scaling_factor"] + (vae_config.get("shift_factor") or 0.0)


def scale_latents(latents, vae_config):
    """A VAE's raw latents (its encoder's output) -> its scaled latents, the space a diffusion UNet works in."""
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        return (latents - _channel_vector(mean, latents)) * vae_config["scaling_factor"] / _channel_vector(std, latents)
    return (latents - (vae_config.get("shift_factor") or 0.0)) * vae_config["scaling_factor"]


def vae_compute_dtype(vae_config, dtype):
    """fp32 for a VAE whose config says it overflows in fp16 (``force_upcast``, as SDXL's), else ``dtype``:
    diffusers' SDXL pipeline decides its decode dtype the same way. bf16 has fp32's range: kept."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype


class LatentTranscoder:
    """Teacher-space latents -> base-space latents: ``scale_b(E_b(clamp(D_t(unscale_t(x)), -1, 1)).mean)``.

    - The image is clamped to [-1, 1], the range the pipeline's own postprocessing clamps to and the range
      the base VAE was trained on: the base encodes the image the teacher shows.
    - The base encoder's posterior *mean* is taken, not a sample: the latent is then a function of the
      teacher's output alone (a cache and on-the-fly training agree without another random stream), and the
      posterior std of SD VAEs is small next to the latents, so a sample would add little but noise.
    - Each VAE runs in :func:`vae_compute_dtype` (SDXL's VAE upcast to fp32 under fp16, the fp16-fix VAE
      in fp16), with autocast off, so an fp16 autocast region cannot push an upcast VAE back to fp16.
    - Slicing is on (one image at a time through each VAE): bounded activation memory at 512+ px, and each
      latent independent of how prompts are batched.

    The transcoder owns the two modules it is given (it casts them); give it a base VAE of its own, not the
    one validation decodes with.
    """

    def __init__(self, teacher_vae, base_vae, dtype):
        self.teacher_vae = self._prepare(teacher_vae, dtype)
        self.base_vae = self._prepare(base_vae, dtype)

    @staticmethod
    def _prepare(vae, dtype):
        vae.requires_grad_(False).eval()
        if vae.dtype != vae_compute_dtype(vae.config, dtype):
            place(vae, None, vae_compute_dtype(vae.config, dtype))
        vae.enable_slicing()
        return vae

    @torch.no_grad()
    def decode(self, latents):
        """Teacher-space latents -> images in [-1, 1] (fp32)."""
        vae = self.teacher_vae
        with torch.autocast(latents.device.type, enabled=False):
            raw = unscale_latents(latents.to(vae.dtype), vae.config)
            return vae.decode(raw).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images):
        """Images in [-1, 1] -> base-space latents (fp32)."""
        vae = self.base_vae
        with torch.autocast(images.device.type, enabled=False):
            raw = vae.encode(images.to(vae.dtype)).latent_dist.mean
            return scale_latents(raw.float(), vae.config)

    def __call__(self, latents):
        return self.encode(self.decode(latents)).to(latents.dtype)


def load_latent_transcoder(teacher_vae, base, dtype, device, revision=None, variant=None, cache_dir=None):
    """A :class:`LatentTranscoder` from the teacher pipeline's VAE module and a fresh copy of the base
    model's VAE (``base/vae``), placed on ``device``."""
    from diffusers import AutoencoderKL

    hub = {"subfolder": "vae", "revision": revision, "cache_dir": cache_dir}
    compute_dtype = vae_compute_dtype(AutoencoderKL.load_config(base, **hub), dtype)
    base_vae = AutoencoderKL.from_pretrained(base, variant=variant, dtype=compute_dtype, **hub)
    return LatentTranscoder(place(teacher_vae, device, None), place(base_vae, device, None), dtype)
