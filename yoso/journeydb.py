"""JourneyDB annotations in, a clean prompt file out (the logic behind ``prepare_journeydb.py``).

JourneyDB ships its training annotations as JSON Lines inside tar.gz archives, one record per image
(``img_path``, ``prompt``, ``Task1`` tags, ``Task2.Caption``, ``Task3`` questions). The training reads
prompt text only, so this module streams the records, takes one text field, cleans it for a CLIP text
encoder, drops empty, out-of-range and duplicate prompts, and writes ``{"prompt": ...}`` lines.

Pieces, in the order the data flows:

- readers      ``.jsonl``, ``.jsonl.gz``, ``.tar``/``.tgz``/``.tar.gz`` (streamed member by member),
               ``.json`` (a list) and ``.txt`` (a prompt a line); bad lines are counted, not raised
- cleaning     ``clean_prompt``: Midjourney parameters, URLs, ``::`` weights, stray separators, spaces
- filtering    empty, word count, duplicates (case and whitespace folded, 64-bit hashes in a set)
- counting     ``ClipTokenCounter``: exact CLIP token counts at dictionary speed, for the 77-token report
- writing      ``AtomicTextFile``: a temporary file in the target folder, renamed only on success
"""

import gzip
import io
import json
import os
import random
import re
import secrets
import tarfile
import time
import unicodedata
import zlib
from pathlib import Path

TEXT_SOURCES = ("prompt", "caption", "both")
CLIP_MAX_TOKENS = 77
MAX_LISTED_PROBLEMS = 10  # malformed lines listed by position in the summary; the rest are only counted
DROP_REASONS = ("missing_text", "empty", "too_few_words", "too_many_words", "duplicate", "over_max_samples")

INPUT_SUFFIXES = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".tar": "tar",
    ".tgz": "tar",
    ".tar.gz": "tar",
    ".jsonl.tgz": "tar",
    ".json": "json",
    ".txt": "txt",
}
OUTPUT_SUFFIXES = (".jsonl", ".txt")


class InputError(Exception):
    """A problem that stops the run; the message is one line that names the file or flag and the fix."""


# --------------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------------

# Midjourney's own parameter names. With a plain ``--`` any name is a parameter; after an em or en
# dash (phone keyboards turn ``--`` into ``—``) only these are, so prose like "a cat —black" stays.
_NUMBER_PARAMETERS = {
    "ar", "aspect", "v", "version", "q", "quality", "s", "stylize", "c", "chaos", "seed", "sameseed",
    "iw", "stop", "w", "weird", "h", "cw", "sw", "sv", "ow", "r", "repeat", "niji", "exp",
}
_FLAG_PARAMETERS = {
    "tile", "hd", "test", "testp", "upbeta", "uplight", "upanime", "video", "fast", "relax", "turbo",
    "creative", "draft", "stealth", "public",
}
_REFERENCE_PARAMETERS = {"sref", "cref", "oref", "p", "personalize", "profile"}  # URLs and codes
_WORD_PARAMETERS = {"style"}  # one word: raw, 4a, cute, expressive, scenic ...
_LIST_PARAMETERS = {"no"}  # free text up to the next parameter: --no text, watermark, people
KNOWN_PARAMETERS = frozenset(
    _NUMBER_PARAMETERS | _FLAG_PARAMETERS | _REFERENCE_PARAMETERS | _WORD_PARAMETERS | _LIST_PARAMETERS
)

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
# A literal "--" first lets the regex engine jump between dashes; whether the dash run continues a word
# ("mid--century" is no parameter) is checked in ``_next_parameter``.
_PARAMETER = re.compile(r"--+([A-Za-z][A-Za-z_]*)")
# "—ar 9:16" as phone keyboards type it: rewritten to "--ar 9:16" when the name is Midjourney's own.
_DASHED_PARAMETER = re.compile(r"(?<![\w\-—–])[—–]+-*([A-Za-z][A-Za-z_]*)")
# One optional number or ratio ("5.2", ".5", "16:9", "-10"), also glued to the name ("--v5").
_NUMBER_VALUE = re.compile(rf"\s*{_NUMBER}(?:\s*:\s*{_NUMBER})?(?![\w.:])")
_REFERENCE_VALUE = re.compile(
    rf"\s+(?!-)(?:<?(?:https?://|www\.)[^\s>]+>?|[A-Za-z0-9_-]*\d[A-Za-z0-9_-]*|random)(?:::{_NUMBER})?(?=\s|$)",
    re.IGNORECASE,
)
_WORD_VALUE = re.compile(r"\s+(?![\-—–])[^\s,]+")

_URL = re.compile(
    r"<?(?:https?://|www\.|s\.mj\.run/)[^\s<>]*[^\s<>.,;:!?)\]}'\"]>?",
    re.IGNORECASE,
)
_WEIGHT = re.compile(rf"::(?:{_NUMBER})?")  # multi-prompt weights: "castle::2 fog::-0.5", bare "::"
_IMAGINE_PREFIX = re.compile(r"^\s*/imagine\b\s*(?:prompt\b\s*:?)?", re.IGNORECASE)
_REPEATED_SEPARATORS = re.compile(r"([,;])[,;]+")
_EDGE_SEPARATORS = " ,;:|-–—"
_SURROGATES = re.compile("[\ud800-\udfff]")  # lone surrogates from "\\ud83d" escapes cannot be written as UTF-8


def _next_parameter(text, pos):
    """The next ``--name`` match at or after ``pos`` whose dashes do not continue a word, or None."""
    while (match := _PARAMETER.search(text, pos)) is not None:
        start = match.start()
        if start == 0 or not (text[start - 1].isalnum() or text[start - 1] in "_-"):
            return match
        pos = match.end()
    return None


def _dash_to_ascii(match):
    name = match.group(1)
    return "--" + name if name.lower() in KNOWN_PARAMETERS else match.group(0)


def _parameter_end(text, name, pos):
    """End of the value that follows parameter ``name`` (its name ends at ``pos``)."""
    if name in _LIST_PARAMETERS:
        following = _next_parameter(text, pos)
        return following.start() if following is not None else len(text)
    if name in _REFERENCE_PARAMETERS:
        while (match := _REFERENCE_VALUE.match(text, pos)) is not None:
            pos = match.end()
        return pos
    if name in _WORD_PARAMETERS:
        match = _WORD_VALUE.match(text, pos)
    else:
        # Midjourney's numeric parameters, the flags, and any other --name: at most one number or ratio.
        match = _NUMBER_VALUE.match(text, pos)
    return match.end() if match is not None else pos


def strip_midjourney_parameters(text):
    """Remove ``--name [value]`` parameters (and their ``—name`` spellings), keeping every other word.

    With ``--`` any name is a parameter; after an em or en dash only Midjourney's own names are, so
    prose such as "a cat —black and white" keeps its words.
    """
    if "—" in text or "–" in text:
        text = _DASHED_PARAMETER.sub(_dash_to_ascii, text)
    pieces = []
    keep_from = 0
    match = _next_parameter(text, 0)
    while match is not None:
        pieces.append(text[keep_from:match.start()])
        keep_from = _parameter_end(text, match.group(1).lower(), match.end())
        match = _next_parameter(text, keep_from)
    if not pieces:
        return text
    pieces.append(text[keep_from:])
    # A space where a parameter was, so the words on either side never glue together.
    return " ".join(pieces)


def clean_prompt(text):
    """A Midjourney prompt made fit for a CLIP text encoder; ``""`` when no words are left.

    Removes Midjourney parameters, URLs, ``::`` weights, a ``/imagine prompt:`` prefix, separators left
    stranded by those removals, and repeated whitespace (line breaks included). Words, case and
    non-ASCII text are kept as they are.
    """
    # Cheap substring tests skip the regular expressions that cannot match: most prompts need few.
    if not text.isascii():
        text = _SURROGATES.sub("", text)
    if "/imagine" in text or "/IMAGINE" in text:
        text = _IMAGINE_PREFIX.sub("", text)
    if "-" in text or "—" in text or "–" in text:
        text = strip_midjourney_parameters(text)
    if "://" in text or "www." in text or "mj.run" in text:
        text = _URL.sub(" ", text)
    if "::" in text:
        text = _WEIGHT.sub(" ", text)
    text = " ".join(text.split())
    # Separators stranded by the removals: "a cat , , watercolor ," -> "a cat, watercolor".
    if " ," in text or " ;" in text:
        text = text.replace(" ,", ",").replace(" ;", ";")
    if ",," in text or ",;" in text or ";," in text or ";;" in text:
        text = _REPEATED_SEPARATORS.sub(r"\1", text)
    return text.strip(_EDGE_SEPARATORS)


def dedupe_key(cleaned):
    """Fixed-size key of a cleaned prompt, equal for prompts that differ only in case or whitespace.

    Python's 64-bit string hash (SipHash): ~70 bytes a key in a set, and for JourneyDB's 1.6 M prompts
    the odds that two different prompts share a key are about 1 in 10 million.
    """
    # Cleaned prompts already have single spaces; casefold also folds "ß" and "STRASSE".
    return hash(cleaned.casefold())


# --------------------------------------------------------------------------------------------------
# CLIP token counts
# --------------------------------------------------------------------------------------------------

# CLIP's pre-tokenizer pattern as SD1.5's tokenizer has it, and its exact equivalent on lowercase ASCII
# text for the standard ``re`` module (three times faster than ``regex``, which is needed for \p{L}).
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_SPLIT_ASCII = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")


def _byte_to_char():
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to chars from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    next_code = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code)
            next_code += 1
    return [table[byte] for byte in range(256)]


class ClipTokenCounter:
    """Exact CLIP token counts (start and end tokens included), fast enough for millions of prompts.

    The tokenizer's own call runs at a few thousand prompts a second on one core, mostly in its
    pre-tokenizer. But CLIP's pre-tokens (words, single digits, runs of punctuation) never span
    whitespace and its BPE works on each pre-token alone, so a prompt's count is 2 plus the counts of
    its whitespace-separated chunks. Each distinct chunk is counted once, with the tokenizer's own
    split pattern and BPE model, and remembered. Tests check the counts against
    ``len(tokenizer(text).input_ids)``.
    """

    max_cached_chunks = 1_000_000  # per cache, ~100 MB at most; a full cache starts over

    def __init__(self, tokenizer):
        import regex  # a dependency of transformers; stdlib ``re`` has no \p{L}

        backend = tokenizer.backend_tokenizer
        layout = json.loads(backend.to_str())
        pre_tokenizer = layout.get("pre_tokenizer") or {}
        steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else []
        normalizers = [step.get("type") for step in (layout.get("normalizer") or {}).get("normalizers", [])]
        if (
            len(steps) != 2
            or steps[0].get("type") != "Split"
            or "Regex" not in steps[0].get("pattern", {})
            or steps[1].get("type") != "ByteLevel"
            or normalizers != ["NFC", "Replace", "Lowercase"]
        ):
            raise ValueError("not a CLIP tokenizer: its normalizer or pre-tokenizer differs from CLIP's")
        pattern = steps[0]["pattern"]["Regex"]
        self._split = regex.compile(pattern)
        # The ASCII shortcut only where the tokenizer's pattern is CLIP's: otherwise ``regex`` for all.
        self._split_ascii = _CLIP_SPLIT_ASCII if pattern == CLIP_SPLIT_PATTERN else self._split
        self._model = backend.model
        self._special_tokens = {tokenizer.bos_token, tokenizer.eos_token}
        self._byte_chars = _byte_to_char()
        self._cache = {}  # whitespace-separated chunk -> tokens
        self._piece_cache = {}  # pre-token -> tokens

    def _piece_count(self, piece):
        if piece in self._special_tokens:
            return 1
        if not piece.isascii():
            piece = "".join(self._byte_chars[byte] for byte in piece.encode("utf-8"))
        return len(self._model.tokenize(piece))

    def _chunk_count(self, chunk):
        if chunk.isascii():
            pieces = self._split_ascii.findall(chunk.lower())
        else:
            pieces = self._split.findall(unicodedata.normalize("NFC", chunk).lower())
        # Pieces repeat across chunks ("8k," "8k." share "8" and "k"): a second cache saves BPE calls.
        cache = self._piece_cache
        total = 0
        for piece in pieces:
            tokens = cache.get(piece)
            if tokens is None:
                if len(cache) >= self.max_cached_chunks:
                    cache.clear()
                tokens = cache[piece] = self._piece_count(piece)
            total += tokens
        return total

    def count(self, text):
        """Number of CLIP tokens ``text`` encodes to, start and end tokens included, before truncation."""
        cache = self._cache
        chunks = text.split()
        counts = list(map(cache.get, chunks))  # one C loop for the usual case: every chunk seen before
        if None in counts:
            for index, tokens in enumerate(counts):
                if tokens is None:
                    if len(cache) >= self.max_cached_chunks:
                        cache.clear()
                    counts[index] = cache[chunks[index]] = self._chunk_count(chunks[index])
        return 2 + sum(counts)


def load_clip_token_counter(pretrained_model_name_or_path=None):
    """A ``ClipTokenCounter`` for SD1.5's tokenizer: from a model folder or hub id (``tokenizer/``
    subfolder), or, without one, rebuilt offline with ``yoso.testing.make_clip_tokenizer``."""
    if pretrained_model_name_or_path is None:
        from yoso.testing import make_clip_tokenizer

        tokenizer = make_clip_tokenizer()
    else:
        from transformers import CLIPTokenizer

        path = Path(pretrained_model_name_or_path)
        subfolder = "tokenizer" if not path.is_dir() or (path / "tokenizer").is_dir() else ""
        tokenizer = CLIPTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder)
    return ClipTokenCounter(tokenizer)


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


def input_kind(path):
    """``"jsonl"``, ``"jsonl.gz"``, ``"tar"``, ``"json"`` or ``"txt"`` from the file name; None if unknown."""
    name = Path(path).name.lower()
    # Longest suffix first, so "x.jsonl.tgz" is an archive and "x.jsonl.gz" is not a tar.
    for suffix in sorted(INPUT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return INPUT_SUFFIXES[suffix]
    return None


def _is_jsonl_member(name):
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(".jsonl") and not base.startswith("._")  # "._x.jsonl": macOS metadata


def _describe_error(error):
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 (byte 0x{error.object[error.start]:02x} at column {error.start + 1})"
    if isinstance(error, json.JSONDecodeError):
        at = " " if error.msg.endswith(" at") else " at "  # "Invalid control character at"
        return f"not JSON ({error.msg}{at}column {error.colno})"
    if isinstance(error, RecursionError):
        return "not JSON (nested too deeply)"
    return str(error)


class _Report:
    """Counts and problem lists gathered while reading; becomes the JSON summary."""

    def __init__(self, strict):
        self.strict = strict
        self.records_read = 0
        self.malformed = 0
        self.malformed_first = []
        self.inputs = []
        self.problems = []

    def add_input(self, path, kind):
        entry = {"path": str(path), "kind": kind, "records": 0, "malformed": 0}
        if kind == "tar":
            entry["jsonl_members"] = []
            entry["skipped_members"] = []
        self.inputs.append(entry)
        return entry

    def bad_line(self, entry, location, unit, position, reason):
        if self.strict:
            raise InputError(
                f"{location} {unit} {position}: {reason}; fix or delete that {unit}, or run without --strict to skip it"
            )
        self.malformed += 1
        entry["malformed"] += 1
        if len(self.malformed_first) < MAX_LISTED_PROBLEMS:
            self.malformed_first.append({"file": location, unit: position, "error": reason})

    def problem(self, entry, message, fix):
        if self.strict:
            raise InputError(f"{message}; {fix}")
        entry["error"] = message
        self.problems.append(message)


class _ByteProgress:
    """A progress bar over the input bytes (compressed bytes for archives), updated every few thousand lines."""

    def __init__(self, paths, enabled):
        from tqdm import tqdm

        total = sum(os.path.getsize(path) for path in paths)
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not enabled, smoothing=0.1)
        self.done_before = 0  # bytes of the inputs already finished
        self.file = None
        self.file_size = 0
        self.records = 0

    def start_file(self, raw_file):
        self.done_before += self.file_size
        self.file = raw_file
        self.file_size = os.fstat(raw_file.fileno()).st_size

    def tick(self):
        if self.file is not None and not self.file.closed:
            self.bar.update(self.done_before + self.file.tell() - self.bar.n)
        self.bar.set_postfix_str(f"{self.records:,} records", refresh=False)

    def close(self, records):
        self.records = records
        self.bar.update(self.done_before + self.file_size - self.bar.n)
        self.bar.set_postfix_str(f"{records:,} records", refresh=False)
        self.bar.close()


_TICK_EVERY = 8192  # lines between progress updates (a power of two: tested with a bit mask)


def _stdlib_loads_line(line):
    """``json.loads`` for one line, minus its encoding sniffing and wrappers (~15% faster)."""
    text = line.decode("utf-8")
    record, end = _RAW_DECODE(text)
    if end != len(text) and not text[end:].isspace():
        raise ValueError("extra data after the record")
    return record


_RAW_DECODE = json.JSONDecoder().raw_decode
try:
    # orjson parses a JourneyDB line 2-3x faster. It is stricter than json (no NaN, no lone surrogates,
    # no byte-order mark), so every line it refuses goes through json.loads; it reads integers past 64
    # bits as floats, which no text field is. The output is the same with or without it.
    from orjson import loads as _fast_loads_line
except ImportError:
    _fast_loads_line = _stdlib_loads_line


def _jsonl_records(lines, location, entry, report, progress):
    fast_loads = _fast_loads_line
    for line_number, line in enumerate(lines, 1):
        if line_number & (_TICK_EVERY - 1) == 0:
            progress.records = report.records_read
            progress.tick()
        if line.isspace():
            continue
        try:
            record = fast_loads(line)
        except (ValueError, RecursionError):  # UnicodeDecodeError too; a BOM lands here and parses below
            try:
                record = json.loads(line.rstrip(b"\r\n"))  # the reference: decides, and words the error
            except (ValueError, RecursionError) as error:
                report.bad_line(entry, location, "line", line_number, _describe_error(error))
                continue
        if type(record) is not dict and type(record) is not str:
            report.bad_line(entry, location, "line", line_number, f"a JSON {type(record).__name__}, not a record")
            continue
        entry["records"] += 1
        report.records_read += 1
        yield record


def _text_records(lines, location, entry, report, progress):
    for line_number, line in enumerate(lines, 1):
        if line_number & (_TICK_EVERY - 1) == 0:
            progress.records = report.records_read
            progress.tick()
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            report.bad_line(entry, location, "line", line_number, _describe_error(error))
            continue
        text = text.strip().lstrip("\ufeff")
        if not text:
            continue
        entry["records"] += 1
        report.records_read += 1
        yield text


def _json_list_records(raw_file, location, entry, report):
    try:
        records = json.loads(raw_file.read())
    except (ValueError, RecursionError) as error:
        line = error.lineno if isinstance(error, json.JSONDecodeError) else 1
        report.bad_line(entry, location, "line", line, _describe_error(error))
        return
    if not isinstance(records, list):
        report.bad_line(entry, location, "line", 1, f"a JSON {type(records).__name__}, expected a list of records")
        return
    for item_number, record in enumerate(records, 1):
        if type(record) is not dict and type(record) is not str:
            report.bad_line(entry, location, "item", item_number, f"a JSON {type(record).__name__}, not a record")
            continue
        entry["records"] += 1
        report.records_read += 1
        yield record


def _tar_records(raw_file, path, entry, report, progress):
    # "r|*": a stream, read once from the start, compression detected; members are never put on disk.
    with tarfile.open(fileobj=raw_file, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            if not _is_jsonl_member(member.name):
                entry["skipped_members"].append(member.name)
                continue
            entry["jsonl_members"].append(member.name)
            # tarfile hands out 8 KB at a time and re-slices its decompressed buffer on each call;
            # 256 KB reads cut that copying (~25% of the archive's read time).
            lines = io.BufferedReader(archive.extractfile(member), buffer_size=256 * 1024)
            yield from _jsonl_records(lines, f"{path}:{member.name}", entry, report, progress)
    if not entry["jsonl_members"]:
        report.problem(
            entry,
            f"{path}: the archive has no .jsonl member (it holds {len(entry['skipped_members'])} other files)",
            "pass the archive that holds the annotations, e.g. train_anno_realease_repath.jsonl.tgz",
        )


def iter_records(paths, report, progress):
    """Every record (a dict, or a str for prompt-only inputs) of every input, in order."""
    for path in paths:
        kind = input_kind(path)
        entry = report.add_input(path, kind)
        try:
            with open(path, "rb") as raw_file:
                progress.start_file(raw_file)
                if kind == "jsonl":
                    yield from _jsonl_records(raw_file, str(path), entry, report, progress)
                elif kind == "jsonl.gz":
                    yield from _jsonl_records(gzip.GzipFile(fileobj=raw_file), str(path), entry, report, progress)
                elif kind == "tar":
                    yield from _tar_records(raw_file, str(path), entry, report, progress)
                elif kind == "json":
                    yield from _json_list_records(raw_file, str(path), entry, report)
                else:
                    yield from _text_records(raw_file, str(path), entry, report, progress)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
            # A truncated download or a file that is not what its name says: keep what was read.
            report.problem(
                entry,
                f"{path}: stopped reading after {entry['records']} records ({type(error).__name__}: {error})",
                "download the file again or drop it from the inputs",
            )


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class AtomicTextFile:
    """A UTF-8 text file written under a temporary name in its own folder and renamed on ``commit``.

    Until then a file already at ``path`` keeps its old content; ``discard`` removes the temporary
    file, so an interrupted or failed run leaves no half-written output.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.temp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        # Mode "x" creates the file with the usual umask permissions (mkstemp would give 0600).
        self.file = open(self.temp_path, "x", encoding="utf-8", newline="\n")
        self.committed = False

    def write(self, text):
        self.file.write(text)

    def commit(self):
        self.file.flush()
        os.fsync(self.file.fileno())  # the data is on disk before the name points at it
        self.file.close()
        os.replace(self.temp_path, self.path)
        self.committed = True

    def discard(self):
        """Remove the temporary file unless it was committed."""
        if self.committed:
            return
        self.file.close()
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


def _line_for(path):
    """How one prompt is written to ``path``: a JSON object a line (.jsonl) or the bare text (.txt)."""
    if Path(path).suffix.lower() == ".jsonl":
        dumps = json.dumps
        return lambda prompt: '{"prompt": ' + dumps(prompt, ensure_ascii=False) + "}\n"
    return lambda prompt: prompt + "\n"


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def default_val_file(output_file):
    output_file = Path(output_file)
    return output_file.with_name(output_file.stem + "_val.txt")


def default_summary_file(output_file):
    output_file = Path(output_file)
    return output_file.with_name(output_file.stem + ".summary.json")


def _raw_texts(records, text_source, dropped, counters):
    """The texts to clean: a record's prompt, its caption, or both; a bare string is a prompt."""
    if text_source == "prompt":  # the common case, kept lean: it runs once per record
        for record in records:
            text = record if type(record) is str else record.get("prompt")
            if type(text) is str:
                yield text
            else:
                dropped["missing_text"] += 1
        return
    for record in records:
        if type(record) is str:
            counters["caption_missing"] += 1
            yield record
            continue
        prompt = record.get("prompt")
        task2 = record.get("Task2")
        caption = task2.get("Caption") if type(task2) is dict else None
        has_prompt = type(prompt) is str
        if type(caption) is str and caption.strip():
            if text_source == "both" and has_prompt:
                yield prompt
            yield caption
            continue
        counters["caption_missing"] += 1
        if has_prompt:
            yield prompt  # "both": the prompt alone; "caption": captions are sometimes missing, fall back
        else:
            dropped["missing_text"] += 1


def _kept_prompts(texts, min_words, max_words, dropped):
    """Cleaned texts that pass the filters, first occurrences only; ``dropped`` counts the rest."""
    seen = set()
    # Exact repeats of raw text are common (JourneyDB has ~2.7 images per prompt): a repeat of a raw
    # text that was kept is a duplicate without cleaning it again. Keys are 64-bit hashes, as in ``seen``.
    kept_raw = set()
    for raw in texts:
        raw_key = hash(raw)
        if raw_key in kept_raw:
            dropped["duplicate"] += 1
            continue
        cleaned = clean_prompt(raw)
        if not cleaned:
            dropped["empty"] += 1
            continue
        words = cleaned.count(" ") + 1
        if words < min_words:
            dropped["too_few_words"] += 1
            continue
        if max_words is not None and words > max_words:
            dropped["too_many_words"] += 1
            continue
        key = dedupe_key(cleaned)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept_raw.add(raw_key)
        yield cleaned


_WRITE_BATCH = 4096


def _write_batch(prompts, out, line, count):
    """Write ``prompts`` to ``out`` and empty the list; return how many CLIP would truncate."""
    out.write("".join(map(line, prompts)))
    over = 0 if count is None else sum(count(prompt) > CLIP_MAX_TOKENS for prompt in prompts)
    prompts.clear()
    return over


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
):
    """Read ``inputs``, write the clean training prompts (and ``val_count`` held-out ones), return the summary.

    Raises ``InputError`` (one-line message) for a strict-mode bad line or when no training prompt is
    left; in both cases no output file is created or changed. The summary is written to ``summary_file``
    (default: next to the output) and returned.
    """
    if text_source not in TEXT_SOURCES:
        raise InputError(f"--text_source {text_source!r}: choose one of {', '.join(TEXT_SOURCES)}")
    started = time.perf_counter()
    output_file = Path(output_file)
    val_file = Path(val_file) if val_file is not None else default_val_file(output_file)
    summary_file = Path(summary_file) if summary_file is not None else default_summary_file(output_file)
    report = _Report(strict)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    counters = {"caption_missing": 0}
    bar = _ByteProgress(inputs, progress)
    train_line, val_line = _line_for(output_file), _line_for(val_file)
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
        records = iter_records(inputs, report, bar)
        texts = _raw_texts(records, text_source, dropped, counters)
        kept = _kept_prompts(texts, min_words, max_words, dropped)
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
        for prompt in kept:
            if written_val < val_count:
                val_out.write(val_line(prompt))
                written_val += 1
                continue
            batch.append(prompt)
            written_train += 1
            if len(batch) == _WRITE_BATCH:
                truncated += _write_batch(batch, train_out, train_line, count)
            if max_samples is not None and written_train >= max_samples:
                stopped_early = not shuffle
                break
        truncated += _write_batch(batch, train_out, train_line, count)
        records.close()  # closes the input files now when max_samples ended the loop early
        bar.close(report.records_read)
        if written_train == 0:
            dropped_text = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n) or "none"
            raise InputError(
                f"no training prompts left ({report.records_read} records read, {report.malformed} malformed, "
                f"{written_val} held out for validation, dropped: {dropped_text}); nothing was written: "
                "check the inputs, --text_source, --min_words/--max_words and --val_count"
            )
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
