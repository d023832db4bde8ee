"""JourneyDB annotations in, a clean prompt file out, for ``train_yoso_lora.py --train_data``.

    python prepare_journeydb.py data/train/train_anno_realease_repath.jsonl.tgz --output_file train_anno.jsonl
    python prepare_journeydb.py part1.jsonl part2.jsonl extra_prompts.txt --shuffle --val_count 16

    python prepare_journeydb.py train_anno_realease_repath.jsonl.tgz --image_root journeydb/data/train/imgs
    # -> also journeydb/data/train/imgs/metadata.jsonl: datasets.load_dataset("imagefolder", data_dir=...)

Inputs: ``.jsonl``, ``.jsonl.gz``, ``.tgz``/``.tar.gz``/``.tar`` (streamed, never unpacked), ``.json``
(a list of records or strings) and ``.txt`` (a prompt a line). Writes ``{"prompt": ...}`` lines (or bare
lines for a ``.txt`` output), an optional held-out prompt file, an optional imagefolder ``metadata.jsonl``
and a JSON summary. The logic lives in the ``yoso/data/journeydb/`` package.
"""

import json
import os
import sys
from pathlib import Path

from yoso.training.cli import BAD_INPUT, HelpFormatter, OneLineErrorParser

from yoso.data.journeydb import (
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_IMAGE_COLUMN,
    METADATA_FILE_NAME,
    OUTPUT_SUFFIXES,
    TEXT_SOURCES,
    InputError,
    column_name_problem,
    default_summary_file,
    default_val_file,
    input_kind,
    load_clip_token_counter,
    prepare,
)

PROG = "prepare_journeydb.py"
INPUT_KINDS = ".jsonl, .jsonl.gz, .tgz/.tar.gz/.tar (streamed), .json (a list of records), .txt (a prompt a line)"


def build_parser():
    parser = OneLineErrorParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Turn JourneyDB annotation files into a clean, deduplicated prompt file for train_yoso_lora.py.",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help=f"annotation files: {INPUT_KINDS}",
    )
    parser.add_argument(
        "--output_file", default="train_anno.jsonl",
        help='where the training prompts go: .jsonl ({"prompt": ...} a line) or .txt (a prompt a line) '
        "(default: train_anno.jsonl)",
    )
    parser.add_argument(
        "--summary_file", default=None,
        help="where the JSON summary goes (default: next to --output_file, NAME.summary.json)",
    )
    parser.add_argument(
        "--text_source", choices=TEXT_SOURCES, default="prompt",
        help="the Midjourney prompt (as the published training), Task2.Caption (the prompt where the "
        "caption is missing), or both as separate training texts (default: prompt)",
    )
    parser.add_argument("--min_words", type=int, default=1, help="drop cleaned prompts with fewer words (default: 1)")
    parser.add_argument("--max_words", type=int, default=None, help="drop cleaned prompts with more words (default: no limit)")
    parser.add_argument(
        "--shuffle", action="store_true",
        help="shuffle the kept prompts before writing (holds them all in memory, a few 100 MB for JourneyDB)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default: 0)")
    parser.add_argument(
        "--max_samples", type=int, default=None,
        help="write at most this many training prompts (without --shuffle: the first ones, and reading stops; "
        "default: all)",
    )
    parser.add_argument(
        "--val_count", type=int, default=0,
        help="hold out this many kept prompts (the first ones, or random ones with --shuffle) for --val_file (default: 0)",
    )
    parser.add_argument(
        "--val_file", default=None,
        help="where the held-out prompts go, one a line (default: next to --output_file, NAME_val.txt)",
    )
    parser.add_argument(
        "--strict", action="store_true",
        help="stop at the first malformed line or unreadable archive instead of counting and skipping it",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path", default=None,
        help="count prompts over CLIP's 77 tokens with this model's tokenizer (a folder or hub id with a "
        "tokenizer/ subfolder; default: SD1.5's tokenizer rebuilt offline, which needs open_clip_torch)",
    )
    parser.add_argument(
        "--skip_truncation_count", action="store_true", help="do not count prompts over CLIP's 77 tokens",
    )
    parser.add_argument(
        "--image_root", default=None, metavar="DIR",
        help=f"also write DIR/{METADATA_FILE_NAME} for datasets' imagefolder: one row per training prompt, "
        "its record's img_path (relative to DIR, leading ./ dropped) and the prompt; records whose image "
        "file is not under DIR are left out of every output before dedupe, and counted (default: none, "
        "no image metadata)",
    )
    parser.add_argument(
        "--image_column_name", default=None,
        help=f"--image_root's column of image file names: file_name, or X_file_name to load as column X "
        f"(default: {DEFAULT_IMAGE_COLUMN}, which loads as the column image)",
    )
    parser.add_argument(
        "--caption_column_name", default=None,
        help=f"--image_root's column of prompts (default: {DEFAULT_CAPTION_COLUMN})",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser, args):
    """Every check that needs no data, so a bad command fails in one line before any reading."""
    for path in args.inputs:
        if not os.path.exists(path):
            parser.error(f"input {path} does not exist: check the path")
        if not os.path.isfile(path):
            parser.error(f"input {path} is not a file: pass the annotation files themselves")
        if input_kind(path) is None:
            parser.error(f"input {path}: unknown file type; use {INPUT_KINDS}")
        if not os.access(path, os.R_OK):
            parser.error(f"input {path} is not readable: check its permissions")
    # each flag's own range is checked by the parser (yoso.training.cli.NUMERIC_FLAG_RANGES)
    if args.max_words is not None and args.max_words < args.min_words:
        parser.error(f"--max_words {args.max_words}: use at least --min_words ({args.min_words})")
    if args.val_file is not None and not args.val_count:
        parser.error("--val_file is given but --val_count is 0: add --val_count N")

    for flag in ("image_column_name", "caption_column_name"):
        if getattr(args, flag) is not None and args.image_root is None:
            parser.error(f"--{flag} is given but --image_root is not: add --image_root DIR")
    args.image_column_name = args.image_column_name or DEFAULT_IMAGE_COLUMN
    args.caption_column_name = args.caption_column_name or DEFAULT_CAPTION_COLUMN
    if args.image_root is not None:
        _check_image_root(parser, args)

    if args.val_file is None:
        args.val_file = str(default_val_file(args.output_file))
    if args.summary_file is None:
        args.summary_file = str(default_summary_file(args.output_file))
    outputs = [("--output_file", args.output_file), ("--summary_file", args.summary_file)]
    if args.val_count:
        outputs.append(("--val_file", args.val_file))
    if args.image_root is not None:
        outputs.append(("--image_root", str(Path(args.image_root) / METADATA_FILE_NAME)))
    for flag, path in outputs:
        if flag == "--image_root":
            continue  # checked in _check_image_root
        if Path(path).is_dir():
            parser.error(f"{flag} {path} is a directory: give a file name")
        if flag != "--summary_file" and Path(path).suffix.lower() not in OUTPUT_SUFFIXES:
            parser.error(f"{flag} {path}: end the name in .jsonl or .txt")
        folder = Path(path).resolve().parent
        if not folder.exists():
            parser.error(f"{flag} {path}: the folder {folder} does not exist; create it first")
        if not folder.is_dir():
            parser.error(f"{flag} {path}: {folder} is a file, not a folder; pick another place")
        if not os.access(folder, os.W_OK | os.X_OK):
            parser.error(f"{flag} {path}: the folder {folder} is not writable; pick another place")
    resolved_inputs = {Path(path).resolve() for path in args.inputs}
    resolved_outputs = {}
    for flag, path in outputs:
        resolved = Path(path).resolve()
        if resolved in resolved_inputs:
            parser.error(f"{flag} {path} is also an input: write to another file")
        if resolved in resolved_outputs:
            parser.error(f"{flag} and {resolved_outputs[resolved]} are the same file {path}: give them different names")
        resolved_outputs[resolved] = flag


def _check_image_root(parser, args):
    root = Path(args.image_root)
    if args.text_source == "both":
        parser.error("--text_source both gives two texts per image; with --image_root use prompt or caption")
    problem = column_name_problem(args.image_column_name, args.caption_column_name)
    if problem:
        parser.error(problem)
    if not root.exists():
        parser.error(f"--image_root {root} does not exist: give the folder the image archives were unpacked into")
    if not root.is_dir():
        parser.error(f"--image_root {root} is a file, not a folder: give the folder the images were unpacked into")
    if not os.access(root, os.W_OK | os.X_OK):
        parser.error(f"--image_root {root}: the folder is not writable, and {METADATA_FILE_NAME} goes there; "
                     "make it writable")
    if (root / METADATA_FILE_NAME).is_dir():
        parser.error(f"--image_root {root}: {root / METADATA_FILE_NAME} is a directory; move it away")


def _warn(message):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        _fail("interrupted; no output file was changed", code=130)


def _run(args):
    token_counter = None
    if not args.skip_truncation_count:
        try:
            token_counter = load_clip_token_counter(args.pretrained_model_name_or_path)
        except Exception as error:  # a missing package or model folder: counting is a report, not the job
            reason = _one_line(f"{type(error).__name__}: {error}")
            if args.pretrained_model_name_or_path is not None:
                _fail(
                    f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: cannot load its CLIP "
                    f"tokenizer ({reason}); fix the path or add --skip_truncation_count"
                )
            _warn(f"prompts over CLIP's 77 tokens are not counted ({reason}); "
                  "pass --pretrained_model_name_or_path to count them")
    try:
        summary = prepare(
            args.inputs,
            args.output_file,
            val_file=args.val_file,
            summary_file=args.summary_file,
            text_source=args.text_source,
            min_words=args.min_words,
            max_words=args.max_words,
            shuffle=args.shuffle,
            seed=args.seed,
            max_samples=args.max_samples,
            val_count=args.val_count,
            strict=args.strict,
            token_counter=token_counter,
            progress=not args.no_progress,
            image_root=args.image_root,
            image_column_name=args.image_column_name,
            caption_column_name=args.caption_column_name,
        )
    except InputError as error:
        _fail(str(error))
    except OSError as error:  # disk full, a folder removed mid-run: the temporary files are already gone
        _fail(f"cannot write the output ({_one_line(str(error))}); no output file was changed", code=1)

    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if summary["malformed"]["count"]:
        first = summary["malformed"]["first"][0]
        where = f"line {first['line']}" if "line" in first else f"item {first['item']}"
        _warn(f"skipped {summary['malformed']['count']} malformed lines (first: {first['file']} {where}: "
              f"{first['error']}); --strict stops at the first one")
    for problem in summary["problems"]:
        _warn(problem)
    images = summary["image_folder"]
    if images is not None and images["image_missing"]["count"]:
        missing = images["image_missing"]
        _warn(f"left out {missing['count']} records whose image is not under {images['image_root']} "
              f"(first: {', '.join(missing['first'])}); check --image_root and the unpacked image archives")
    if images is not None and images["no_img_path"]:
        _warn(f"left out {images['no_img_path']} records without a usable img_path "
              "(none, not text, absolute, a URL, or outside the image root)")
    written = summary["written"]
    print(f"wrote {written['train']} training prompts to {args.output_file}"
          + (f" and {written['validation']} held-out prompts to {args.val_file}" if args.val_count else "")
          + (f", {images['rows']} image rows to {images['metadata_file']} ({images['image_missing']['count']} "
             "records left out: image missing)" if images is not None else "")
          + f"; summary in {args.summary_file}", file=sys.stderr)
    return summary


def _one_line(text, limit=300):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(message, code=BAD_INPUT):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
