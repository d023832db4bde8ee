"""JourneyDB annotations in, a clean prompt file out (the logic behind ``prepare_journeydb.py``).

JourneyDB ships its training annotations as JSON Lines inside tar.gz archives, one record per image
(``img_path``, ``prompt``, ``Task1`` tags, ``Task2.Caption``, ``Task3`` questions). The training reads
prompt text, so this package streams the records, takes one text field, cleans it for a CLIP text
encoder, drops empty, out-of-range and duplicate prompts, and writes ``{"prompt": ...}`` lines; with an
image root it also writes a ``datasets`` imagefolder ``metadata.jsonl`` that pairs them with the images.

One module a step, in the order the data flows:

- ``readers``       ``.jsonl``, ``.jsonl.gz``, ``.tar``/``.tgz``/``.tar.gz`` (streamed member by member),
                    ``.json`` (a list) and ``.txt`` (a prompt a line); bad lines are counted, not raised
- ``report``        what reading found (counts, first malformed lines, unreadable inputs); ``InputError``
- ``texts``         ``--text_source``: the prompt, the caption, or both
- ``image_folder``  ``img_path`` -> a file under the image root; the imagefolder's metadata rows
- ``cleaning``      ``clean_prompt``: Midjourney parameters, URLs, ``::`` weights, stray separators, spaces
- ``filters``       empty, word count, duplicates (case and whitespace folded, 64-bit hashes in a set)
- ``tokens``        ``ClipTokenCounter``: exact CLIP token counts at dictionary speed, for the 77-token report
- ``output``        output names and line formats; ``AtomicTextFile``: written whole or not at all
- ``prepare``       the pipeline and its JSON summary
"""

from yoso.data.journeydb.cleaning import (
    KNOWN_PARAMETERS,
    clean_prompt,
    strip_midjourney_parameters,
)
from yoso.data.journeydb.filters import PromptFilter, dedupe_key
from yoso.data.journeydb.image_folder import (
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_IMAGE_COLUMN,
    METADATA_FILE_NAME,
    ImageFolder,
    column_name_problem,
    image_file_name,
)
from yoso.data.journeydb.output import (
    OUTPUT_SUFFIXES,
    AtomicTextFile,
    default_summary_file,
    default_val_file,
)
from yoso.data.journeydb.prepare import DROP_REASONS, IMAGE_DROP_REASONS, prepare
from yoso.data.journeydb.readers import INPUT_SUFFIXES, input_kind, iter_records
from yoso.data.journeydb.report import MAX_LISTED_PROBLEMS, InputError, ReadReport
from yoso.data.journeydb.texts import TEXT_SOURCES
from yoso.data.journeydb.tokens import (
    CLIP_MAX_TOKENS,
    ClipTokenCounter,
    load_clip_token_counter,
)

__all__ = [
    "CLIP_MAX_TOKENS",
    "DEFAULT_CAPTION_COLUMN",
    "DEFAULT_IMAGE_COLUMN",
    "DROP_REASONS",
    "IMAGE_DROP_REASONS",
    "INPUT_SUFFIXES",
    "KNOWN_PARAMETERS",
    "MAX_LISTED_PROBLEMS",
    "METADATA_FILE_NAME",
    "OUTPUT_SUFFIXES",
    "TEXT_SOURCES",
    "AtomicTextFile",
    "ClipTokenCounter",
    "ImageFolder",
    "InputError",
    "PromptFilter",
    "ReadReport",
    "clean_prompt",
    "column_name_problem",
    "dedupe_key",
    "default_summary_file",
    "default_val_file",
    "image_file_name",
    "input_kind",
    "iter_records",
    "load_clip_token_counter",
    "prepare",
    "strip_midjourney_parameters",
]
