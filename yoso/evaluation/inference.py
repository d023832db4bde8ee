"""Inference with a YOSO LoRA on an SD1.5-family pipeline: the four sampling modes, LoRA loading with
checks that fail in one line, and the informative prior (IPI) for one-step sampling (SPEC section 7).

Modes (``MODES``):

- ``lcm``           LCMScheduler, 2 steps by default (timesteps 999, 499), guidance 1.5.
- ``dpm``           DPM-Solver++ multistep from the base's scheduler config, 2 steps, guidance 1.5. The
                    spacing is forced to "trailing" so that 2 steps are 999, 499 like LCM: an SD1.5 config
                    that spells out ``timestep_spacing="leading"`` (as configs saved by recent diffusers
                    versions do) would otherwise give 667, 334, starting from pure noise at t = 667.
- ``one_step_ipi``  LCMScheduler, 1 step (t = 999), starting from the informative prior
                    ``x_T = add_noise(mean + std * randn, randn, 999)`` instead of pure noise.
- ``one_step``      LCMScheduler, 1 step from pure noise, guidance 1.0 (for comparison).

The latent statistics file (``latent_stats.safetensors``, written by the training next to the LoRA) is
``yoso.data.latent_stats``'s.

Everything the command line reports to a user goes through :class:`InferenceError`, whose message is
one line.
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from yoso.data.latent_stats import LATENT_STATS_NAME, compute_latent_stats
from yoso.method.lora import LORA_WEIGHT_NAME

MODES = ("lcm", "dpm", "one_step_ipi", "one_step")
DEFAULT_STEPS = {"lcm": 2, "dpm": 2, "one_step_ipi": 1, "one_step": 1}
DEFAULT_GUIDANCE = {"lcm": 1.5, "dpm": 1.5, "one_step_ipi": 1.5, "one_step": 1.0}
ONE_STEP_MODES = ("one_step_ipi", "one_step")
IPI_TIMESTEP = 999
ADAPTER_NAME = "yoso"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


class InferenceError(Exception):
    """A user-facing error with a one-line message (bad path, wrong file, LoRA that does not fit)."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


def one_line(exc, limit=300):
    """The first non-empty line of an exception's message (its type name when there is none), shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def looks_like_hub_id(spec):
    return bool(_HUB_ID.match(str(spec))) and ".." not in str(spec)


# --------------------------------------------------------------------------------------------------
# Latent statistics (the informative prior; the file itself is in yoso.data.latent_stats)


def find_latent_stats(lora_source, explicit=None):
    """Path of the latent statistics to use: ``explicit`` if given (must exist), else the file beside the
    LoRA (a local folder, or the same hub repository). ``None`` when there is none."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise InferenceError(f"--latent_stats {explicit}: no such file")
        return Path(explicit)
    if lora_source.local_dir is not None:
        candidate = lora_source.local_dir / LATENT_STATS_NAME
        return candidate if candidate.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(lora_source.location, LATENT_STATS_NAME))
    except Exception:
        return None


def missing_stats_message(lora_spec):
    return (
        f"--mode one_step_ipi needs latent statistics, and --lora {lora_spec} has no {LATENT_STATS_NAME} beside it. "
        f"A training run (train_yoso_lora.py) writes {LATENT_STATS_NAME} into its --output_dir next to the LoRA: "
        f"point --lora at that folder or pass the file with --latent_stats PATH, "
        f"or compute the statistics from N two-step samples of this pipeline with --ipi_from_samples N (e.g. 32)."
    )


def ipi_latents(scheduler, mean, std, batch_size, generator=None, timestep=IPI_TIMESTEP):
    """The informative prior, ready to pass as ``latents=``: ``init = mean + std * randn``,
    ``x_T = scheduler.add_noise(init, randn, timestep)`` (two separate draws from ``generator``, in float32 on
    the generator's device), divided by ``scheduler.init_noise_sigma`` because the pipeline multiplies the
    latents it is given by that (1.0 for LCM), so that ``x_T`` itself is what reaches the UNet."""
    device = generator.device if generator is not None else torch.device("cpu")
    mean = mean.to(device, torch.float32)
    std = torch.as_tensor(std).to(device, torch.float32)
    shape = (batch_size, *mean.shape)
    init = mean + std * torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    x_t = scheduler.add_noise(init, noise, torch.tensor([int(timestep)], device=device))
    return x_t / scheduler.init_noise_sigma


# --------------------------------------------------------------------------------------------------
# Checks that need no model


@dataclass
class LoraSource:
    spec: str  # what the user passed
    location: str  # folder or hub id for load_lora_weights
    weight_name: str | None  # file name inside location (None: diffusers' default for a hub id)
    local_dir: Path | None  # folder holding the weights, None for a hub id


def check_lora_file(path):
    """A readable safetensors file with LoRA tensors in it, or an InferenceError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise InferenceError(f"--lora {path} is not a readable safetensors file: {one_line(exc)}") from exc
    if not any("lora" in k.lower() for k in keys):
        example = f", e.g. {keys[0]}" if keys else ""
        raise InferenceError(
            f"--lora {path} holds no LoRA tensors ({len(keys)} tensors, none named *lora*{example}): "
            f"is it a full model checkpoint rather than a LoRA?"
        )


def resolve_lora(spec):
    """Where the LoRA is: a folder with pytorch_lora_weights.safetensors, a .safetensors file, or a hub id.
    Local files are checked here, before any model is loaded."""
    path = Path(spec).expanduser()
    if path.is_dir():
        weights = path / LORA_WEIGHT_NAME
        if not weights.is_file():
            others = sorted(p.name for p in path.glob("*.safetensors"))
            hint = f" (it has {', '.join(others)}: pass the file itself)" if others else ""
            raise InferenceError(f"--lora {spec}: folder has no {LORA_WEIGHT_NAME}{hint}")
        check_lora_file(weights)
        return LoraSource(str(spec), str(path), LORA_WEIGHT_NAME, path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InferenceError(f"--lora {spec} is not a .safetensors file (a LoRA folder, .safetensors file or hub id is expected)")
        check_lora_file(path)
        return LoraSource(str(spec), str(path.parent), path.name, path.parent)
    if looks_like_hub_id(spec):
        return LoraSource(str(spec), str(spec), None, None)
    raise InferenceError(f"--lora {spec}: no such file or folder (and not a hub id of the form owner/name)")


def check_base_model(spec):
    """A local base model must be a diffusers pipeline folder; anything else must look like a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InferenceError(f"--pretrained_model_name_or_path {spec} is not a diffusers pipeline folder (no model_index.json)")
        return
    if path.is_file():
        raise InferenceError(f"--pretrained_model_name_or_path {spec} is a file; a diffusers pipeline folder or hub id is expected")
    if not looks_like_hub_id(spec):
        raise InferenceError(f"--pretrained_model_name_or_path {spec}: no such folder (and not a hub id of the form owner/name)")


def resolve_device_dtype(device="auto", dtype="auto"):
    """auto: CUDA in float16 when available, else CPU in float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise InferenceError(f"--dtype {dtype}: choose one of auto, {', '.join(dtypes)}")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise InferenceError(f"--device {device}: {one_line(exc)}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError("--device cuda: CUDA is not available on this machine")
    return device, dtypes[dtype]


# --------------------------------------------------------------------------------------------------
# Pipelines


@contextmanager
def quiet_diffusers():
    """Silence diffusers' logging (its LoRA loader logs multi-line errors before it raises)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity(dlogging.CRITICAL)
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def load_pipeline(base_model, device, dtype):
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(base_model, dtype=dtype)
    except Exception as exc:
        raise InferenceError(f"could not load --pretrained_model_name_or_path {base_model}: {one_line(exc)}") from exc
    if getattr(pipe, "unet", None) is None or not hasattr(pipe, "load_lora_weights"):
        raise InferenceError(f"--pretrained_model_name_or_path {base_model} is a {type(pipe).__name__}, not a UNet pipeline that takes LoRAs (SD1.5 family expected)")
    try:
        return pipe.to(device)
    except Exception as exc:
        raise InferenceError(f"could not move the pipeline to --device {device}: {one_line(exc)}") from exc


def make_scheduler(pipe, mode):
    """The scheduler of ``mode``, built from the pipeline's own scheduler config."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    if mode not in MODES:
        raise InferenceError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    if mode == "dpm":
        return DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return LCMScheduler.from_config(pipe.scheduler.config)


def set_scheduler(pipe, mode):
    pipe.scheduler = make_scheduler(pipe, mode)
    return pipe.scheduler


def lora_module_names(state_dict, prefix="unet"):
    """Module names (relative to the UNet) that a diffusers-format LoRA state dict adapts."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    sub = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    if sub and not any("lora_A" in k for k in sub):
        sub = convert_unet_state_dict_to_peft(sub)
    return sorted({k.split(".lora_")[0] for k in sub if ".lora_" in k})


def load_lora(pipe, source, base_model="the base model", lora_scale=1.0, fuse=False, adapter_name=ADAPTER_NAME):
    """Load the LoRA into ``pipe`` (``load_lora_weights``), checking that it fits the UNet: every adapted
    module must exist and have the LoRA's shapes. ``lora_scale`` scales it (``set_adapters`` weight, or the
    fusing scale); ``fuse`` merges it into the weights and drops the LoRA layers (same images, faster)."""
    kwargs = {"weight_name": source.weight_name} if source.weight_name else {}
    misfit = f"--lora {source.spec} does not fit --pretrained_model_name_or_path {base_model}"
    try:
        with quiet_diffusers():
            state, _ = pipe.lora_state_dict(source.location, unet_config=pipe.unet.config, **kwargs)[:2]
    except Exception as exc:
        where = "" if source.local_dir else " (not a local file or folder, tried as a hub id)"
        raise InferenceError(f"could not load --lora {source.spec}{where}: {one_line(exc)}") from exc
    names = lora_module_names(state)
    if not names:
        raise InferenceError(f"--lora {source.spec} has no UNet LoRA tensors (keys starting with 'unet.' in the diffusers format)")
    modules = dict(pipe.unet.named_modules())
    absent = [n for n in names if n not in modules]
    if absent:
        raise InferenceError(f"{misfit}: {len(absent)} of its {len(names)} LoRA modules are not in the UNet, e.g. {absent[0]}")
    try:
        with quiet_diffusers():
            pipe.load_lora_weights(source.location, adapter_name=adapter_name, **kwargs)
    except Exception as exc:
        text = str(exc)
        mismatches = [line.strip() for line in text.splitlines() if "size mismatch" in line]
        if mismatches:
            more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
            raise InferenceError(f"{misfit}: {mismatches[0]}{more}") from exc
        raise InferenceError(f"{misfit}: {one_line(exc)}") from exc
    if fuse:
        pipe.fuse_lora(lora_scale=float(lora_scale), adapter_names=[adapter_name])
        pipe.unload_lora_weights()
    elif float(lora_scale) != 1.0:
        pipe.set_adapters([adapter_name], adapter_weights=[float(lora_scale)])
    return pipe


def latent_stats_from_samples(pipe, prompts, num_samples, generator=None, guidance_scale=1.5, batch_size=4):
    """Latent statistics from ``num_samples`` two-step LCM samples of ``pipe`` (prompts cycled), in the
    VAE-scaled latent space; ``(mean, std)``. Restores the pipeline's scheduler afterwards."""
    if num_samples < 1:
        raise InferenceError(f"--ipi_from_samples must be >= 1, got {num_samples}")
    scheduler = pipe.scheduler
    set_scheduler(pipe, "lcm")
    try:
        latents = []
        for start in range(0, num_samples, batch_size):
            batch = [prompts[i % len(prompts)] for i in range(start, min(start + batch_size, num_samples))]
            out = pipe(prompt=batch, num_inference_steps=2, guidance_scale=guidance_scale, generator=generator, output_type="latent")
            latents.append(out.images.float().cpu())
    finally:
        pipe.scheduler = scheduler
    return compute_latent_stats(torch.cat(latents))


def generate(pipe, prompt, mode, steps=None, guidance_scale=None, generator=None, num_images_per_prompt=1,
             latent_stats=None, output_type="pil"):
    """Images for one prompt with the pipeline's current scheduler (set it with :func:`set_scheduler`).
    ``one_step_ipi`` needs ``latent_stats=(mean, std)``; the image size then follows the statistics."""
    steps = DEFAULT_STEPS[mode] if steps is None else steps
    guidance_scale = DEFAULT_GUIDANCE[mode] if guidance_scale is None else guidance_scale
    extra = {}
    if mode == "one_step_ipi":
        if latent_stats is None:
            raise InferenceError("one_step_ipi needs latent statistics")
        mean, std = latent_stats
        if mean.shape[0] != pipe.unet.config.in_channels:
            raise InferenceError(f"latent statistics have {mean.shape[0]} channels, the UNet takes {pipe.unet.config.in_channels}")
        latents = ipi_latents(pipe.scheduler, mean, std, num_images_per_prompt, generator)
        extra = {
            "latents": latents.to(pipe.device, pipe.unet.dtype),
            "height": mean.shape[1] * pipe.vae_scale_factor,
            "width": mean.shape[2] * pipe.vae_scale_factor,
        }
    out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
               num_images_per_prompt=num_images_per_prompt, output_type=output_type, **extra)
    return out.images
