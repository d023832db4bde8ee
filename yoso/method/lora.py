"""The LoRA: which UNet modules get one, and how it is saved and loaded in the diffusers format.

Saving goes through ``StableDiffusionPipeline.save_lora_weights`` with the peft state dict *and* the
adapter metadata. The shorter ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))``
route silently loses the attention LoRAs and the alpha scale on reload; tests check the round trip
with numbers for every module type.
"""

import os
import tempfile
from pathlib import Path

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# The public recipe's targets: attention, transformer projections and feed-forward, every resnet conv,
# the resampling convs and the time-embedding projections.
DEFAULT_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0",
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut",
    "downsamplers.0.conv", "upsamplers.0.conv",
    "time_emb_proj",
)


LORA_INITS = ("default", "gaussian")


def make_lora_config(rank=64, alpha=8, target_modules=DEFAULT_TARGET_MODULES, init="default"):
    """Both inits start the LoRA as the identity (B = 0); A is Kaiming-uniform ("default": peft's default,
    as the released script) or normal with std 1/rank ("gaussian": diffusers' LoRA examples)."""
    from peft import LoraConfig

    if init not in LORA_INITS:
        raise ValueError(f"--init_lora_weights must be one of {LORA_INITS}, got {init!r}")
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True if init == "default" else "gaussian",
                      target_modules=list(target_modules))


def module_matches_target(module_name, target):
    """peft's rule for a plain-string target: the full name, or a dotted suffix of it."""
    return module_name == target or module_name.endswith("." + target)


def unmatched_targets(module_names, target_modules):
    """Targets that name no module in ``module_names`` (a typo, or a module this UNet does not have)."""
    names = list(module_names)
    return [t for t in target_modules if not any(module_matches_target(n, t) for n in names)]


def add_lora(unet, rank=64, alpha=8, target_modules=DEFAULT_TARGET_MODULES, init="default"):
    """Freeze ``unet`` and add a trainable LoRA adapter named "default"."""
    unet.requires_grad_(False)
    unet.add_adapter(make_lora_config(rank, alpha, target_modules, init))
    return unet


def lora_named_parameters(unet):
    """The LoRA tensors (the trainable parameters), by their full module names, in a fixed order."""
    return [(name, p) for name, p in unet.named_parameters() if "lora_" in name]


def lora_state_dict(unet, tensors=None):
    """peft-format LoRA state dict of ``unet``; with ``tensors`` (full name -> tensor, e.g. an EMA),
    those values are exported under the same keys instead of the live weights."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, state_dict=tensors)


def save_lora(unet, output_dir, tensors=None):
    """Write ``output_dir/pytorch_lora_weights.safetensors`` (diffusers format, loadable with
    ``pipe.load_lora_weights(output_dir)``), atomically: written under a temporary name, then renamed."""
    from diffusers import StableDiffusionPipeline

    from yoso.utils.atomic import follow_umask

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet, tensors).items()}
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-lora-") as tmp, _quiet_diffusers():
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
        follow_umask(Path(tmp) / LORA_WEIGHT_NAME)  # safetensors writes 0600
        os.replace(Path(tmp) / LORA_WEIGHT_NAME, output_dir / LORA_WEIGHT_NAME)
    return output_dir / LORA_WEIGHT_NAME


class _quiet_diffusers:
    """diffusers logs the temporary path it wrote to; the caller reports the final one."""

    def __enter__(self):
        from diffusers.utils import logging

        self.level = logging.get_verbosity()
        logging.set_verbosity_warning()

    def __exit__(self, *exc):
        from diffusers.utils import logging

        logging.set_verbosity(self.level)
        return False


def load_lora_into_unet(unet, lora_dir):
    """Load a LoRA written by :func:`save_lora` into ``unet``'s existing "default" adapter (for resuming)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(str(lora_dir), weight_name=LORA_WEIGHT_NAME)
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{lora_dir}: LoRA keys that this UNet does not have, e.g. {unexpected[:3]}")
    return unet


class AdaptersDisabled:
    """``with AdaptersDisabled(unet):`` runs the base model; peft's ``disable_adapters()`` is not a context manager."""

    def __init__(self, unet):
        self.unet = unet

    def __enter__(self):
        self.unet.disable_adapters()
        return self.unet

    def __exit__(self, *exc):
        self.unet.enable_adapters()
        return False
