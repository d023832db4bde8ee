"""The files of a run's ``--output_dir`` that users take away, and their names in a Hub repository.

On the Hub the non-EMA LoRA is ``pytorch_lora_weights_non_ema.safetensors`` at the top level, not
``non_ema/pytorch_lora_weights.safetensors`` (see ``yoso.outputs.hub``)."""

import json
import re
from pathlib import Path

from yoso.outputs.kohya import KOHYA_WEIGHT_NAME
from yoso.data.latent_stats import LATENT_STATS_NAME
from yoso.method.lora import LORA_WEIGHT_NAME

MODEL_CARD_NAME = "README.md"
# The final files the last run wrote (relative paths): an earlier run into the same --output_dir may have left
# others (a kohya copy, non_ema/) that describe another LoRA; the card and the upload name only these.
RUN_FILES_NAME = "yoso_run_files.json"
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
# The grids of the run now in the folder: a new run into the same --output_dir empties it (an earlier run's grids
# stay on disk but are not this LoRA's), a resumed run keeps the grids of the run it continues.
VALIDATION_RECORD = "validation/grids.json"


def hub_files(output_dir):
    """``{local path: path in the repository}`` for the files of ``output_dir`` that are uploaded, sorted;
    local paths are relative to ``output_dir`` with ``/`` separators."""
    output_dir = Path(output_dir)
    present = {}
    for relative, in_repo in HUB_NAMES.items():
        if relative.startswith("validation/"):
            continue
        # the card is rewritten at the end of every run; the final files must be this run's
        if relative == MODEL_CARD_NAME and (output_dir / relative).is_file() or is_run_file(output_dir, relative):
            present[relative] = in_repo
    grids = validation_grids(output_dir)
    for relative in grids:
        present[relative] = relative
    if grids and (output_dir / "validation/README.txt").is_file():  # the legend, rewritten with every grid
        present["validation/README.txt"] = HUB_NAMES["validation/README.txt"]
    return dict(sorted(present.items()))


def validation_grids(output_dir):
    """This run's validation grids on disk (relative paths): those of VALIDATION_RECORD, or every
    ``validation/step-<N>.png`` in a folder written before the record existed."""
    folder = Path(output_dir) / "validation"
    if not folder.is_dir():
        return []
    on_disk = [f"validation/{p.name}" for p in folder.iterdir() if p.is_file() and VALIDATION_GRID.match(f"validation/{p.name}")]
    record = Path(output_dir) / VALIDATION_RECORD
    if record.is_file():
        recorded = set(json.loads(record.read_text())["grids"])
        on_disk = [g for g in on_disk if g in recorded]
    return sorted(on_disk)


def _write_validation_record(output_dir, grids):
    from yoso.utils.atomic import atomic_path

    with atomic_path(Path(output_dir) / VALIDATION_RECORD) as tmp:
        tmp.write_text(json.dumps({"grids": sorted(set(grids))}, indent=1) + "\n")


def start_validation_record(output_dir, resumed):
    """At the start of a run: a new run forgets the grids an earlier run left in ``output_dir``; a resumed one
    keeps the record of the run it continues."""
    if not resumed and (Path(output_dir) / "validation").is_dir():
        _write_validation_record(output_dir, [])


def add_validation_grid(output_dir, relative):
    """Record ``relative`` (``validation/step-<N>.png``) as one of this run's grids."""
    record = Path(output_dir) / VALIDATION_RECORD
    grids = json.loads(record.read_text())["grids"] if record.is_file() else []
    _write_validation_record(output_dir, [*grids, relative])


def latest_validation_grid(output_dir):
    """The relative path of the highest-step ``validation/step-<N>.png``, or None."""
    grids = [p for p in hub_files(output_dir) if VALIDATION_GRID.match(p)]
    return max(grids, key=lambda p: int(re.search(r"\d+", Path(p).name).group())) if grids else None


def read_run_files(output_dir):
    """The set of relative paths in ``output_dir``'s RUN_FILES_NAME, or None (a folder written before it existed)."""
    path = Path(output_dir) / RUN_FILES_NAME
    if not path.is_file():
        return None
    return set(json.loads(path.read_text())["files"])


def write_run_files(output_dir, relatives):
    """Record ``relatives`` (paths relative to ``output_dir``) as the files of the last run, replacing the record."""
    from yoso.utils.atomic import atomic_path

    with atomic_path(Path(output_dir) / RUN_FILES_NAME) as tmp:
        tmp.write_text(json.dumps({"files": sorted(set(relatives))}, indent=1) + "\n")


def add_run_files(output_dir, relatives):
    """Add files written later from the run's outputs (convert_lora_to_kohya.py) to an existing record."""
    known = read_run_files(output_dir)
    if known is not None:
        write_run_files(output_dir, known | set(relatives))


def is_run_file(output_dir, relative):
    """Whether ``relative`` exists in ``output_dir`` and was written by the last run (when it is recorded)."""
    if not (Path(output_dir) / relative).is_file():
        return False
    known = read_run_files(output_dir)
    return known is None or relative in known
