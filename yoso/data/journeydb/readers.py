"""Annotation files in, records out: ``.jsonl``, ``.jsonl.gz``, ``.tar``/``.tgz``/``.tar.gz`` (streamed
member by member, never unpacked), ``.json`` (a list) and ``.txt`` (a prompt a line).

A record is a dict (a JSON object) or a str (a bare prompt). Bad lines are counted in the ``ReadReport``,
not raised; an input that breaks off keeps what was read before and is reported with the reason.
"""

import bz2
import gzip
import io
import json
import lzma
import os
import tarfile
import zlib
from pathlib import Path

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


class ByteProgress:
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


class _MemberData(io.RawIOBase):
    """A tar member's data read straight from the archive's stream. tarfile's own member reader raises on a
    short read and drops the bytes of that read (up to the whole member, for a small archive); this one
    hands over every byte the stream still gives, then raises: the lines before the break are kept."""

    def __init__(self, stream, size):
        self.stream, self.left = stream, size

    def readable(self):
        return True

    def readinto(self, buffer):
        want = min(len(buffer), self.left)
        if want == 0:
            return 0
        data = self.stream.read(want)
        if not data:
            raise tarfile.ReadError(f"unexpected end of data ({self.left} bytes of the member missing)")
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


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
            archive.fileobj.seek(member.offset_data)  # a stream: only ever forward (a no-op here)
            lines = io.BufferedReader(_MemberData(archive.fileobj, member.size), buffer_size=256 * 1024)
            yield from _jsonl_records(lines, f"{path}:{member.name}", entry, report, progress)
    if not entry["jsonl_members"]:
        report.problem(
            entry,
            f"{path}: the archive has no .jsonl member (it holds {len(entry['skipped_members'])} other files)",
            "pass the archive that holds the annotations, e.g. train_anno_realease_repath.jsonl.tgz",
        )


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
_COMPRESSIONS = ((b"\x1f\x8b", "gzip", gzip.open), (b"BZh", "bzip2", bz2.open), (b"\xfd7zXZ\x00", "xz", lzma.open))
_TAR_BLOCK = 512
_TAR_MAGIC = slice(257, 262)  # "ustar" in every POSIX, GNU and pax tar header


def unreadable_reason(path, kind, error):
    """Why an input broke off before its first record, in the user's terms: the decoders' own words
    ("truncated header", "empty file") mislead when a text file is named .tgz or a download was cut."""
    detail = f"{type(error).__name__}: {error}"
    if not isinstance(error, (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)):
        return detail  # the system could not open or read the file: its words say why
    try:
        with open(path, "rb") as file:
            head = file.read(_TAR_BLOCK)
    except OSError:
        return detail
    if not head:
        return "the file is empty"
    compression, opener = next(((name, opener) for magic, name, opener in _COMPRESSIONS if head.startswith(magic)),
                               (None, None))
    plain_tar = kind == "tar" and head[_TAR_MAGIC] == b"ustar"
    if (kind == "jsonl.gz" and compression != "gzip") or (compression is None and not plain_tar):
        expected = "tar" if Path(path).name.lower().endswith(".tar") else "gzip"
        return f"not a {expected} file"
    if plain_tar:
        return f"the tar archive ends early or is corrupt: {detail}"
    if kind == "tar" and not _starts_with_a_tar_header(opener, path):
        return f"the {compression} file holds no tar archive"
    return f"its {compression} data ends early or is corrupt: {detail}"


def _starts_with_a_tar_header(opener, path):
    """False only when the compressed data decodes but does not begin with a tar header."""
    try:
        with opener(path, "rb") as file:
            block = file.read(_TAR_BLOCK)
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        return True  # it does not decode that far: the data is cut or corrupt, not of the wrong kind
    return len(block) == _TAR_BLOCK and block[_TAR_MAGIC] == b"ustar"


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
        except _READ_ERRORS as error:
            # A truncated download or a file that is not what its name says: keep what was read.
            if entry["records"]:
                message = f"{path}: stopped reading after {entry['records']} records ({type(error).__name__}: {error})"
            else:
                message = f"{path} could not be read ({unreadable_reason(path, kind, error)})"
            report.problem(entry, message, "download the file again or drop it from the inputs")
