"""Webdataset-style tar shards (LAION's and img2dataset's layout), read lazily.

A shard is a plain ``.tar`` whose members are grouped into samples by key: ``000123.jpg``,
``000123.txt`` and ``000123.json`` are the ``jpg``, ``txt`` and ``json`` members of sample
``000123`` (the key is the member path up to the first dot of its file name; a sample's members are
consecutive in the archive). A sample's "columns" are its member extensions; the fields of a
``.json`` member can also be named as a caption column (img2dataset writes ``caption`` there).

Scanning a shard reads only the 512-byte tar headers and seeks over the member data, so a
sample is a few integers (where its members lie) until someone reads it; a rank reads the bytes of
its own samples only.

Own reader, not datasets' ``webdataset`` loader (datasets 5.2.0, streaming; measured by
``benchmarks/bench_data_machinery.py``, docs/development.md "Libraries vs own code"): 2,718 samples/s (scan and
read every sample) against 1,051 with ``decode(False)`` and 103 decoding to PIL; resuming at sample 48 in 0.010 s
(headers only) against 0.041 s for its ``skip`` (which reads every member before); a shard cut mid-member is read
up to the cut here (33 whole samples, a warning) where the loader raises ``ReadError: unexpected end of data``;
and the loader hands every rank every sample's bytes. ``webdataset`` is not a dependency.
"""

import json
import logging
import tarfile
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)

# In order of preference when the image column is the generic "image" (datasets' name for it).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
GENERIC_IMAGE_COLUMN = "image"
DEFAULT_TAR_CAPTION_COLUMN = "txt"


class UnreadableSample(Exception):
    """One sample that cannot be used (missing member, truncated data, undecodable image or caption)."""

    def __init__(self, name, reason):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class TarSample(NamedTuple):
    """Where one sample's members lie in its shard: ``members`` maps extension -> (data offset, size)."""

    shard: int
    key: str
    members: dict


def split_member_name(name):
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``); (name, None) for a name without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return name, None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def find_tar_shards(folder):
    """The ``.tar`` files directly inside ``folder``, sorted by name (the natural sample order)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(".tar"))


def iter_tar_samples(path, shard_index=0):
    """Yield the samples of one shard as :class:`TarSample`, reading headers only.

    A shard cut short (an interrupted download) ends where its readable headers end; the loss is logged,
    not raised, and every rank sees the same truncation, so all ranks still agree on the sample order.
    """
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                if not info.isfile():
                    continue
                member_key, extension = split_member_name(info.name)
                if extension is None:
                    continue
                if member_key != key and members:
                    yield TarSample(shard_index, key, members)
                    members = {}
                key = member_key
                members[extension] = (info.offset_data, info.size)
                tar.members.clear()  # tarfile keeps every header it read; a shard can hold 100k members
    except (tarfile.TarError, EOFError, OSError) as error:
        logger.warning(f"tar shard {path}: unreadable after key {key!r}, rest of the shard skipped ({error})")
    if members:
        yield TarSample(shard_index, key, members)


def read_member(path, location, name):
    offset, size = location
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise UnreadableSample(name, f"truncated ({len(data)} of {size} bytes)")
    return data


def sample_columns(path, sample):
    """(member extensions, fields of the ``.json`` member) of one sample: the names a column may take."""
    fields = []
    if "json" in sample.members:
        try:
            record = json.loads(read_member(path, sample.members["json"], sample.key))
        except (UnreadableSample, ValueError):
            record = None
        if isinstance(record, dict):
            fields = list(record)
    return list(sample.members), fields


def resolve_image_extension(members, image_column):
    """The member holding the image: ``image_column`` itself, or for the generic "image" the first image
    extension present."""
    if image_column in members:
        return image_column
    if image_column == GENERIC_IMAGE_COLUMN:
        for extension in IMAGE_EXTENSIONS:
            if extension in members:
                return extension
    return None


class TarShards:
    """A list of tar shards as the streamed image source wants them: ``num_shards``, ``records(shard)``
    (lazy :class:`TarSample` s) and ``read(record) -> (image bytes, caption value, name)``."""

    def __init__(self, paths, image_column=GENERIC_IMAGE_COLUMN, caption_column=DEFAULT_TAR_CAPTION_COLUMN):
        self.paths = [Path(p) for p in paths]
        self.image_column = image_column
        self.caption_column = caption_column
        self.bytes_read = 0  # image and caption bytes read (tests check that a rank reads only its samples)

    @property
    def num_shards(self):
        return len(self.paths)

    def records(self, shard):
        return iter_tar_samples(self.paths[shard], shard)

    def sample_name(self, sample):
        return f"{self.paths[sample.shard].name}:{sample.key}"

    def read(self, sample):
        path, name = self.paths[sample.shard], self.sample_name(sample)
        extension = resolve_image_extension(sample.members, self.image_column)
        if extension is None:
            raise UnreadableSample(name, f"no image member (.{self.image_column}); members: {', '.join(sample.members)}")
        image = read_member(path, sample.members[extension], f"{name}.{extension}")
        self.bytes_read += len(image)
        if self.caption_column in sample.members:
            data = read_member(path, sample.members[self.caption_column], f"{name}.{self.caption_column}")
            self.bytes_read += len(data)
            try:
                caption = data.decode("utf-8")
            except UnicodeDecodeError:
                raise UnreadableSample(f"{name}.{self.caption_column}", "caption is not UTF-8 text") from None
        elif "json" in sample.members:
            data = read_member(path, sample.members["json"], f"{name}.json")
            self.bytes_read += len(data)
            try:
                record = json.loads(data)
            except ValueError:
                raise UnreadableSample(f"{name}.json", "malformed JSON") from None
            if not isinstance(record, dict) or self.caption_column not in record:
                raise UnreadableSample(name, f"no .{self.caption_column} member and no {self.caption_column!r} field in .json")
            caption = record[self.caption_column]
        else:
            raise UnreadableSample(name, f"no caption member (.{self.caption_column})")
        return image, caption, f"{name}.{extension}"


def first_sample(paths):
    """(path, sample) of the first sample in the first shard that has one, or (None, None)."""
    for index, path in enumerate(paths):
        for sample in iter_tar_samples(path, index):
            return path, sample
    return None, None

