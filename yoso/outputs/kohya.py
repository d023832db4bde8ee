"""The LoRA in kohya format (``lora_unet_*`` keys), for AUTOMATIC1111, ComfyUI and other UIs.

A diffusers-format LoRA (what :func:`yoso.method.lora.save_lora` writes) is read with diffusers' own LoRA reader
and renamed with ``diffusers.utils.convert_state_dict_to_kohya``. That function writes every module's
``.alpha`` as its rank (scale 1), which would silently rescale a LoRA trained with ``lora_alpha != rank``
(the recipe: rank 64, alpha 8, scale 0.125); the true alpha comes from the adapter metadata that
``save_lora`` stores in the file, resolved per module with peft's own pattern rule.

Tensors keep their dtype and values: loading the kohya file with ``pipe.load_lora_weights`` gives the
same UNet as loading the diffusers file (tested to 1e-5 on every target module type).
"""

import json
import re
from pathlib import Path

from yoso.utils.atomic import atomic_path
from yoso.method.lora import LORA_WEIGHT_NAME

KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"

_PEFT_KEY = re.compile(r"^unet\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class KohyaExportError(ValueError):
    """A LoRA that cannot be exported; the message is one line naming the file and the fix."""


def kohya_path_for(lora_file):
    """Where the kohya copy of ``lora_file`` goes: beside it, ``<stem>_kohya.safetensors``."""
    lora_file = Path(lora_file)
    return lora_file.with_name(f"{lora_file.stem}_kohya.safetensors")


def resolve_lora_file(path):
    """``path`` itself if it is a file, else ``path/pytorch_lora_weights.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise KohyaExportError(f"{path}: no such file (give a {LORA_WEIGHT_NAME} or the folder that holds it)")
    return path


def read_lora_header(lora_file):
    """``(tensor names, adapter config or None)`` from the file's header only (no tensor is read), with
    every check that makes a file unexportable; so a batch of files can be refused before any is written."""
    from safetensors import safe_open

    lora_file = Path(lora_file)
    try:
        with safe_open(str(lora_file), framework="pt") as f:
            names, metadata = list(f.keys()), f.metadata() or {}
    except Exception as error:  # safetensors raises several types for a file that is not safetensors
        raise KohyaExportError(f"{lora_file}: not a readable safetensors file ({_first_line(error)})") from None
    if not names:
        raise KohyaExportError(f"{lora_file}: holds no tensors")
    if all(name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for name in names):
        raise KohyaExportError(f"{lora_file}: already in kohya format (lora_unet_* keys); nothing to convert")
    others = [n for n in names if not n.startswith("unet.")]
    if others:
        raise KohyaExportError(f"{lora_file}: keys outside the UNet (e.g. {others[0]}); only UNet LoRAs in diffusers "
                               f"format (unet.* keys, as train_yoso_lora.py writes) are converted")
    lora_modules(_to_peft_names(dict.fromkeys(names)), source=lora_file)
    config = _unet_adapter_config(lora_file, metadata)
    if config is not None:
        for flag in ("use_dora", "use_rslora"):
            if config.get(flag):
                raise KohyaExportError(f"{lora_file}: a LoRA trained with {flag}=True has no kohya LoRA equivalent")
        if config.get("lora_bias"):
            raise KohyaExportError(f"{lora_file}: a LoRA with bias terms (lora_bias=True) has no kohya LoRA equivalent")
    return names, config


def _unet_adapter_config(lora_file, metadata):
    """The UNet adapter's peft config (``r``, ``lora_alpha``, patterns) that diffusers stored, or None."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except ValueError:
        raise KohyaExportError(f"{lora_file}: its {LORA_ADAPTER_METADATA_KEY} metadata is not valid JSON") from None
    # diffusers packs each component's config with its prefix: "unet.r", "unet.lora_alpha", ...
    config = {k[len("unet."):]: v for k, v in packed.items() if k.startswith("unet.")}
    return config or None


def module_alpha(module_name, rank, config):
    """The ``lora_alpha`` peft gives ``module_name``: its ``alpha_pattern`` entry, else ``lora_alpha``.
    Without stored config diffusers loads a LoRA with alpha = rank (scale 1), so that is the alpha here too."""
    from peft.utils.other import get_pattern_key

    if config is None:
        return float(rank)
    patterns = config.get("alpha_pattern") or {}
    key = get_pattern_key(patterns.keys(), module_name)
    return float(patterns.get(key, config.get("lora_alpha", rank)))


def _to_peft_names(state):
    from diffusers.utils import convert_unet_state_dict_to_peft

    # Older diffusers files name attention LoRAs "<attn>.processor.to_q_lora.down"; map them to peft's names.
    return convert_unet_state_dict_to_peft(state)


def lora_modules(peft_keys, source=""):
    """The LoRA'd module names of ``unet.<module>.lora_A/B.weight`` keys; raises on any other key or a lone half."""
    where = f"{source}: " if source else ""
    modules = {}
    for key in peft_keys:
        match = _PEFT_KEY.match(key)
        if match is None:
            raise KohyaExportError(f"{where}unexpected LoRA key {key!r} (expected unet.<module>.lora_A.weight / lora_B.weight)")
        modules.setdefault(match["module"], set()).add(match["part"])
    unpaired = sorted(m for m, parts in modules.items() if parts != {"A", "B"})
    if unpaired:
        raise KohyaExportError(f"{where}module {unpaired[0]} has a lora_A without a lora_B (or the reverse)")
    return sorted(modules)


def kohya_state_dict(unet_lora_state, config):
    """kohya-format state dict from a diffusers/peft one (``unet.<module>.lora_A.weight`` keys)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    state = _to_peft_names(dict(unet_lora_state))
    modules = lora_modules(state)
    kohya = convert_state_dict_to_kohya(state)
    # convert_state_dict_to_kohya sets every alpha to the rank; write the alpha the LoRA was trained with.
    for module in modules:
        rank = state[f"unet.{module}.lora_A.weight"].shape[0]
        alpha_key = "lora_unet_" + module.replace(".", "_") + ".alpha"
        if alpha_key not in kohya:
            raise KohyaExportError(f"diffusers' kohya conversion gave no {alpha_key}")
        kohya[alpha_key] = torch.tensor(module_alpha(module, rank, config), dtype=torch.float32)
    expected = 3 * len(modules)
    if len(kohya) != expected:
        raise KohyaExportError(f"diffusers' kohya conversion gave {len(kohya)} tensors for {len(modules)} modules "
                               f"(expected {expected}: lora_down, lora_up, alpha each)")
    return {k: v.contiguous() for k, v in kohya.items()}


def kohya_metadata(config):
    """kohya's own header fields (strings), shown by the UIs' LoRA info panels."""
    metadata = {"ss_network_module": "networks.lora"}
    if config is not None and "r" in config and "lora_alpha" in config:
        metadata["ss_network_dim"] = str(config["r"])
        metadata["ss_network_alpha"] = str(config["lora_alpha"])
    return metadata


def save_kohya_lora(lora, destination=None):
    """Write the kohya-format copy of a diffusers-format LoRA; returns its path.

    ``lora``: a ``pytorch_lora_weights.safetensors`` file or the folder holding one (an ``--output_dir``,
    its ``non_ema/``, a ``checkpoint-<step>/``). ``destination`` defaults to
    ``pytorch_lora_weights_kohya.safetensors`` beside it. Written atomically (temporary name, then
    rename); raises :class:`KohyaExportError` (one line) before writing anything for a file it cannot convert.
    """
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from yoso.method.lora import _quiet_diffusers

    lora_file = resolve_lora_file(lora)
    _, config = read_lora_header(lora_file)
    with _quiet_diffusers():
        state, _ = StableDiffusionPipeline.lora_state_dict(str(lora_file.parent), weight_name=lora_file.name)
    kohya = kohya_state_dict(state, config)
    destination = Path(destination) if destination is not None else kohya_path_for(lora_file)
    with atomic_path(destination) as tmp:
        save_file(kohya, str(tmp), metadata=kohya_metadata(config))
    return destination


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
