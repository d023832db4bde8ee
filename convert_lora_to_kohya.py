"""Write kohya-format copies (for AUTOMATIC1111, ComfyUI, ...) of the diffusers-format LoRAs of a run.

    python convert_lora_to_kohya.py yoso-lora-output                  # its LoRA and non_ema/'s
    python convert_lora_to_kohya.py yoso-lora-output/checkpoint-500   # a checkpoint's LoRA (the raw one, not the EMA)
    python convert_lora_to_kohya.py path/to/pytorch_lora_weights.safetensors

Each ``pytorch_lora_weights.safetensors`` gets a ``pytorch_lora_weights_kohya.safetensors`` beside it
(replaced if present; written under a temporary name, then renamed). The written paths are printed, one a
line. Every input is checked before anything is written; bad input stops with one ``error:`` line and
exit status 2. The conversion lives in yoso/outputs/kohya.py.
"""

import sys
from pathlib import Path

from yoso.training.cli import BAD_INPUT, HelpFormatter, OneLineErrorParser

PROG = "convert_lora_to_kohya.py"


def build_parser():
    p = OneLineErrorParser(prog=PROG, formatter_class=HelpFormatter, description="Write pytorch_lora_weights_kohya.safetensors beside each "
                      "diffusers-format LoRA of a train_yoso_lora.py --output_dir, a checkpoint-<step> folder or a file.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="an --output_dir (its LoRA and non_ema/'s), a checkpoint-<step> folder, or a .safetensors file")
    return p


def lora_files_in(path):
    """The diffusers-format LoRA files that ``path`` stands for (a file, or a folder and its non_ema/)."""
    from yoso.outputs.kohya import KohyaExportError
    from yoso.method.lora import LORA_WEIGHT_NAME

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise KohyaExportError(f"{path}: no such file or folder")
    files = [f for f in (path / LORA_WEIGHT_NAME, path / "non_ema" / LORA_WEIGHT_NAME) if f.is_file()]
    if not files:
        raise KohyaExportError(f"{path}: no {LORA_WEIGHT_NAME} in it or in its non_ema/ (give a train_yoso_lora.py "
                               f"--output_dir, a checkpoint-<step> folder or a LoRA file)")
    return files


def main(argv=None):
    """Convert; returns the written paths. Bad input: one line on stderr, exit status 2, nothing written."""
    args = build_parser().parse_args(argv)
    from yoso.utils.library_noise import quiet_library_notices

    quiet_library_notices()  # before yoso.outputs.kohya imports diffusers: transformers' "requires torchvision" notices
    from yoso.outputs.kohya import KohyaExportError, read_lora_header, save_kohya_lora

    try:
        files = [f for path in args.paths for f in lora_files_in(path)]
        files = list(dict.fromkeys(f.resolve() for f in files))  # the same file named twice is converted once
        for f in files:
            read_lora_header(f)
    except KohyaExportError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        sys.exit(BAD_INPUT)

    from tqdm.auto import tqdm

    written = []
    for f in tqdm(files, desc="kohya export", unit="file", disable=len(files) < 2):
        written.append(save_kohya_lora(f))
        print(written[-1], flush=True)
        record_in_run(Path(f).resolve(), Path(written[-1]).resolve())
    return written


def record_in_run(lora_file, kohya_file):
    """A kohya copy of a run's final LoRA joins the run's files (the model card and --push_to_hub name it)."""
    from yoso.outputs.output_files import add_run_files, read_run_files

    for output_dir in (lora_file.parent, lora_file.parent.parent):
        known = read_run_files(output_dir)
        if known is not None and lora_file.relative_to(output_dir).as_posix() in known:
            add_run_files(output_dir, [kohya_file.relative_to(output_dir).as_posix()])
            return


if __name__ == "__main__":
    main()
