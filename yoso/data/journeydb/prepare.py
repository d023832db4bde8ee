"""The pipeline of ``prepare_journeydb.py``: read, pick the text, clean, filter, dedupe, write, summarize.

Records stream through generators (readers -> texts -> filters) into batched writes; only the dedupe
keys, and with ``shuffle`` the kept prompts, are held in memory.
"""

import json
import random
import time
from pathlib import Path

from yoso.data.journeydb.filters import PromptFilter, kept_prompts, kept_prompts_with_images
from yoso.data.journeydb.image_folder import (
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_IMAGE_COLUMN,
    ImageFolder,
)
from yoso.data.journeydb.output import (
    AtomicTextFile,
    default_summary_file,
    default_val_file,
    prompt_line_format,
)
from yoso.data.journeydb.readers import ByteProgress, iter_records
from yoso.data.journeydb.report import InputError, ReadReport
from yoso.data.journeydb.texts import TEXT_SOURCES, record_texts, record_texts_with_images
from yoso.data.journeydb.tokens import CLIP_MAX_TOKENS

DROP_REASONS = ("missing_text", "empty", "too_few_words", "too_many_words", "duplicate", "over_max_samples")
IMAGE_DROP_REASONS = ("no_img_path", "image_missing")  # with an image root only; checked before the text
MAX_PROBLEMS_IN_ERROR = 3  # unreadable inputs named in the "no training prompts left" error

_WRITE_BATCH = 4096


def _write_batch(prompts, out, line, count):
    """Write ``prompts`` to ``out`` and empty the list; return how many CLIP would truncate."""
    out.write("".join(map(line, prompts)))
    over = 0 if count is None else sum(count(prompt) > CLIP_MAX_TOKENS for prompt in prompts)
    prompts.clear()
    return over


def _no_prompts_message(report, dropped, written_val, images):
    causes = report.problems[:MAX_PROBLEMS_IN_ERROR]
    more = len(report.problems) - len(causes)
    if more:
        causes.append(f"and {more} more problems")
    if images is not None and images.image_missing:
        causes.append(f"{images.image_missing} records have no image under {images.root} "
                      f"(first: {images.image_missing_first[0]})")
    cause = ": " + "; ".join(causes) if causes else ""
    dropped_text = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n) or "none"
    return (
        f"no training prompts left{cause} ({report.records_read} records read, {report.malformed} malformed, "
        f"{written_val} held out for validation, dropped: {dropped_text}); nothing was written: "
        f"check the inputs, --text_source, --min_words/--max_words{', --image_root' if images else ''} "
        "and --val_count"
    )


def prepare(
    inputs,
    output_file,
    *,
    val_file=None,
    summary_file=None,
    text_source="prompt",
    min_words=1,
    max_words=None,
    shuffle=False,
    seed=0,
    max_samples=None,
    val_count=0,
    strict=False,
    token_counter=None,
    progress=True,
    image_root=None,
    image_column_name=DEFAULT_IMAGE_COLUMN,
    caption_column_name=DEFAULT_CAPTION_COLUMN,
):
    """Read ``inputs``, write the clean training prompts (and ``val_count`` held-out ones), return the summary.

    With ``image_root``, also write ``image_root/metadata.jsonl`` for ``datasets``' imagefolder: one row
    ``{image_column_name: <img_path relative to the root>, caption_column_name: <the training prompt>}``
    for each training prompt, whose record's image file is under the root. Records whose image is not
    there are left out before their text is looked at, and counted.

    Raises ``InputError`` (one-line message) for a strict-mode bad line or when no training prompt is
    left; in both cases no output file is created or changed. The summary is written to ``summary_file``
    (default: next to the output) and returned.
    """
    if text_source not in TEXT_SOURCES:
        raise InputError(f"--text_source {text_source!r}: choose one of {', '.join(TEXT_SOURCES)}")
    if image_root is not None and text_source == "both":
        raise InputError("--text_source both gives two texts per image; with --image_root use prompt or caption")
    started = time.perf_counter()
    output_file = Path(output_file)
    val_file = Path(val_file) if val_file is not None else default_val_file(output_file)
    summary_file = Path(summary_file) if summary_file is not None else default_summary_file(output_file)
    images = ImageFolder(image_root, image_column_name, caption_column_name) if image_root is not None else None
    report = ReadReport(strict)
    dropped = dict.fromkeys(DROP_REASONS + (IMAGE_DROP_REASONS if images is not None else ()), 0)
    counters = {"caption_missing": 0}
    prompt_filter = PromptFilter(min_words, max_words, dropped)
    bar = ByteProgress(inputs, progress)
    train_line, val_line = prompt_line_format(output_file), prompt_line_format(val_file)
    written_train = written_val = truncated = 0
    stopped_early = False
    count = token_counter.count if token_counter is not None else None

    outputs = []  # the temporary files, renamed to their names only when everything has succeeded
    try:
        train_out = AtomicTextFile(output_file)
        outputs.append(train_out)
        val_out = AtomicTextFile(val_file) if val_count else None
        if val_out is not None:
            outputs.append(val_out)
        metadata_out = AtomicTextFile(images.metadata_file) if images is not None else None
        if metadata_out is not None:
            outputs.append(metadata_out)
        records = iter_records(inputs, report, bar)
        if images is None:
            kept = kept_prompts(record_texts(records, text_source, dropped, counters), prompt_filter)
        else:  # (prompt, image file name) pairs
            pairs = record_texts_with_images(records, text_source, images, dropped, counters)
            kept = kept_prompts_with_images(pairs, prompt_filter)
        if shuffle:
            # Shuffling needs every kept prompt in memory: ~1.3 M short strings for JourneyDB, a few 100 MB.
            kept = list(kept)
            random.Random(seed).shuffle(kept)
            if max_samples is not None and len(kept) > val_count + max_samples:
                dropped["over_max_samples"] = len(kept) - val_count - max_samples
                del kept[val_count + max_samples:]
        # Training prompts are written and counted in batches: fewer calls, and the token counter's
        # caches stay warm in the CPU cache (counting between JSON records ran 3x slower).
        batch = []
        metadata_batch = []  # rows of the training prompts in ``batch``, with their images
        for item in kept:
            if images is not None:
                item, file_name = item
            if written_val < val_count:
                val_out.write(val_line(item))  # held out: its image stays out of the training rows too
                written_val += 1
                continue
            batch.append(item)
            if images is not None:
                metadata_batch.append(images.metadata_line(item, file_name))
            written_train += 1
            if len(batch) == _WRITE_BATCH:
                truncated += _write_batch(batch, train_out, train_line, count)
                if metadata_batch:
                    metadata_out.write("".join(metadata_batch))
                    metadata_batch.clear()
            if max_samples is not None and written_train >= max_samples:
                stopped_early = not shuffle
                break
        truncated += _write_batch(batch, train_out, train_line, count)
        if metadata_batch:
            metadata_out.write("".join(metadata_batch))
        records.close()  # closes the input files now when max_samples ended the loop early
        bar.close(report.records_read)
        if images is not None:
            dropped["no_img_path"] = images.no_img_path
            dropped["image_missing"] = images.image_missing
        if written_train == 0:
            raise InputError(_no_prompts_message(report, dropped, written_val, images))
        summary = {
            "inputs": report.inputs,
            "text_source": text_source,
            "records_read": report.records_read,
            "malformed": {"count": report.malformed, "first": report.malformed_first},
            "problems": report.problems,
            # Every text taken from a record ends up dropped for one reason or written.
            "texts_considered": sum(dropped.values()) + written_train + written_val,
            "caption_missing": counters["caption_missing"] if text_source != "prompt" else 0,
            "dropped": dropped,
            "written": {"train": written_train, "validation": written_val},
            "stopped_at_max_samples": stopped_early,
            "clip_truncated": (
                {"max_tokens": CLIP_MAX_TOKENS, "count": truncated, "of_train_prompts": written_train}
                if count is not None
                else None
            ),
            "image_folder": images.summary(written_train) if images is not None else None,
            "output_file": str(output_file),
            "val_file": str(val_file) if val_count else None,
            "summary_file": str(summary_file),
            "settings": {
                "min_words": min_words, "max_words": max_words, "shuffle": shuffle, "seed": seed,
                "max_samples": max_samples, "val_count": val_count, "strict": strict,
            },
            "seconds": round(time.perf_counter() - started, 3),
        }
        summary_out = AtomicTextFile(summary_file)
        outputs.append(summary_out)
        summary_out.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        # The files appear only now, each whole, the summary last.
        for output in outputs:
            output.commit()
        return summary
    finally:
        for output in outputs:
            output.discard()  # a no-op for the committed ones
        bar.bar.close()
