"""The files of a run's ``--output_dir`` that users take away, and their names in a Hub repository.

On the Hub the non-EMA LoRA is ``pytorch_lora_weights_non_ema.safetensors`` at the top level, not
``non_ema/pytorch_lora_weights.safetensors`` (see ``yoso.outputs.hub``)."""

import re
from pathlib import Path

from yoso.outputs.kohya import KOHYA_WEIGHT_NAME
from yoso.data.latent_stats import LATENT_STATS_NAME
from yoso.method.lora import LORA_WEIGHT_NAME

MODEL_CARD_NAME = "README.md"
NON_EMA_WEIGHT_NAME = "pytorch_lora_weights_non_ema.safetensors"
NON_EMA_KOHYA_WEIGHT_NAME = "pytorch_lora_weights_non_ema_kohya.safetensors"

# local path (relative to --output_dir) -> path in the Hub repository
HUB_NAMES = {
    MODEL_CARD_NAME: MODEL_CARD_NAME,
    LORA_WEIGHT_NAME: LORA_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME: KOHYA_WEIGHT_NAME,
    f"non_ema/{LORA_WEIGHT_NAME}": NON_EMA_WEIGHT_NAME,
    f"non_ema/{KOHYA_WEIGHT_NAME}": NON_EMA_KOHYA_WEIGHT_NAME,
    LATENT_STATS_NAME: LATENT_STATS_NAME,
    "validation/README.txt": "validation/README.txt",
}
VALIDATION_GRID = re.compile(r"^validation/step-\d+\.png$")


def hub_files(output_dir):
    """``{local path: path in the repository}`` for the files of ``output_dir`` that are uploaded, sorted;
    local paths are relative to ``output_dir`` with ``/`` separators."""
    output_dir = Path(output_dir)
    present = {}
    for relative, in_repo in HUB_NAMES.items():
        if (output_dir / relative).is_file():
            present[relative] = in_repo
    validation = output_dir / "validation"
    if validation.is_dir():
        for grid in validation.iterdir():
            relative = f"validation/{grid.name}"
            if grid.is_file() and VALIDATION_GRID.match(relative):
                present[relative] = relative
    return dict(sorted(present.items()))


def latest_validation_grid(output_dir):
    """The relative path of the highest-step ``validation/step-<N>.png``, or None."""
    grids = [p for p in hub_files(output_dir) if VALIDATION_GRID.match(p)]
    return max(grids, key=lambda p: int(re.search(r"\d+", Path(p).name).group())) if grids else None
