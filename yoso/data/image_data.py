"""Real images with captions in place of the teacher's latents (SPEC 7b, "or real data").

Where the data comes from (diffusers' ``train_text_to_image`` flag names):

==========================================  =====================================================  ==========
flags                                       what is read                                           route
==========================================  =====================================================  ==========
``--train_data_dir DIR`` with ``*.tar``     webdataset-style tar shards (LAION, img2dataset),      streamed
                                            read lazily by ``yoso.data.tar_shards``
``--train_data_dir DIR``                    datasets' imagefolder: images + ``metadata.jsonl``     map-style
``--dataset_name NAME``                     a hub dataset or local folder through ``datasets``     map-style
``--dataset_name NAME --streaming``         the same as an ``IterableDataset``, shard by shard     streamed
==========================================  =====================================================  ==========

Columns: ``--image_column`` (default "image"; for tar shards "image" means the first image member:
jpg, jpeg, png, webp, ...), ``--caption_column`` (default per route, see ``resolve_caption_column``).

Order and sharding. Every epoch has one global order of samples, a function of (seed, epoch) and the
data only: a permutation of the rows for map-style data (the prompt sampler's), for streams the
shards in an order permuted by (seed, epoch) read through a shuffle buffer seeded by (seed, epoch).
It is cut into global batches of ``batch_size * world_size``; rank r takes its slice of each, so
W ranks together see exactly the samples 1 rank sees with a W times larger batch, disjointly. The
incomplete last global batch of an epoch is dropped. A resumed run starts after ``start_batch``
batches (the number consumed) and sees exactly the rest of the uninterrupted sequence; a stream is
resumed by scanning past the consumed samples (tar headers only, no image is decoded).

Sample identity. A sample's id is its row (map-style) or ``shard << 32 | position in shard``
(streams; for a single shard, the row). Its random crop, flip, caption choice (for list captions)
and VAE noise come from generators seeded by (seed, epoch, id), so they do not depend on the batch it
lands in, the number of processes, or where a run was resumed.

Bad samples. An image that cannot be read or decoded (or a sample without a usable caption) is
skipped: its slot takes the next readable sample of the epoch's order (looking forward, then back at
the epoch's end), which every rank would choose alike, so all ranks still run the same number of
steps. Each skip is counted (``source.skipped``) and each bad file named once in a warning.

Own threads, not torch's DataLoader (measured, ``benchmarks/bench_data_machinery.py``, docs/development.md
"Libraries vs own code"): decoding in ``num_workers`` threads (``_load_slots``) behind one ``prefetch`` thread gave
21.9 images/s against 14.5 for a DataLoader with 2 worker processes over the same batches (2 shared vCPUs, a
0.15 s step between batches), a first batch in 0.64 s against 0.85 s, and no forked workers (69-77 MB private
memory for 2, forked in training from a process holding the models). The streamed routes also read one shuffle
buffer per epoch in one global order, which worker processes could keep only by each replaying the whole
stream, and the skip counts and bad-file names would stay in the workers. ``prefetch`` stops and joins its
thread when it is closed or collected, so a run that ends or fails while it reads ahead exits cleanly (tested;
without the join the same test aborts: "terminate called without an active exception").
"""

import itertools
import logging
import random
import threading
from collections import deque
from pathlib import Path
from typing import NamedTuple

import torch

from yoso.data.image_processing import caption_text, decode_image, first_line, preprocess_image, sample_generator, sample_seed
from yoso.data.image_processing import encode_images, latent_generators  # noqa: F401  (the training loop's one import)
from yoso.data.tar_shards import (
    DEFAULT_TAR_CAPTION_COLUMN,
    GENERIC_IMAGE_COLUMN,
    IMAGE_EXTENSIONS,
    TarShards,
    UnreadableSample,
    find_tar_shards,
    first_sample,
    resolve_image_extension,
    sample_columns,
)

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_COLUMN = GENERIC_IMAGE_COLUMN
DEFAULT_DATASET_CAPTION_COLUMN = "text"  # diffusers' train_text_to_image default
DEFAULT_PROMPT_CAPTION_COLUMN = "prompt"  # prompt files (.jsonl from prepare_journeydb.py)
DEFAULT_SHUFFLE_BUFFER_SIZE = 1000
MAX_TRIES = 64  # candidates tried for one slot before the data is declared broken
SHARD_ID_SHIFT = 32

ROUTE_PROMPTS, ROUTE_TAR, ROUTE_DATASET, ROUTE_DATASET_STREAM = "prompts", "tar", "dataset", "dataset_stream"
STREAMED_ROUTES = (ROUTE_TAR, ROUTE_DATASET_STREAM)


class ImageDataError(ValueError):
    """Image data that cannot be used; the message is one line naming the flag and the fix."""


class ImageBatch(NamedTuple):
    """One rank's micro-batch: ``pixel_values`` float32 [B, 3, res, res] in [-1, 1]."""

    epoch: int
    batch_in_epoch: int
    ids: list
    captions: list
    pixel_values: torch.Tensor
    skipped: int = 0  # slots of this batch whose sample was unreadable (each took a replacement)


class Sample(NamedTuple):
    id: int
    name: str
    caption: str
    pixel_values: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Batch sources
# --------------------------------------------------------------------------------------------------

class _OrderPositions:
    """An epoch's order held in full (map-style data: a permutation of row numbers)."""

    def __init__(self, order):
        self.order = order

    def get(self, position):
        return int(self.order[position]) if 0 <= position < len(self.order) else None

    def release(self, position):
        pass


class _StreamWindow:
    """An epoch's order as a stream: positions are pulled on demand, and those more than ``keep`` below
    the last released position are dropped (kept for a slot whose replacements run past the epoch end)."""

    def __init__(self, refs, keep, progress=None):
        self._refs = iter(refs)
        self._items = deque()
        self._start = 0  # position of _items[0]
        self._floor = 0
        self._keep = keep
        self._ended = False
        self.length = None  # known once the stream ended
        self._progress = progress

    def release(self, position):
        self._floor = max(self._floor, position - self._keep)
        self._drop()

    def _drop(self):
        while self._items and self._start < self._floor:
            self._items.popleft()
            self._start += 1

    def get(self, position):
        if position < self._start:
            raise IndexError(f"stream position {position} was already released")
        skipping = self._start + len(self._items) < self._floor
        bar = None
        if skipping and self._progress is not None:
            bar = self._progress(self._floor - self._start - len(self._items))
        try:
            while self._start + len(self._items) <= position:
                if self._ended:
                    return None
                try:
                    self._items.append(next(self._refs))
                except StopIteration:
                    self._ended = True
                    self.length = self._start + len(self._items)
                    return None
                if bar is not None:
                    bar.update(1)
                self._drop()
        finally:
            if bar is not None:
                bar.close()
        return self._items[position - self._start]


class ImageBatchSource:
    """Rank ``rank``'s micro-batches of (captions, pixel values), forever: ``batches(start_batch)``.

    Subclasses give an epoch's order (``_epoch_positions``), a sample's id (``_ref_id``) and its raw
    contents (``_read``); this class cuts global batches, takes the rank's slice, decodes, replaces bad
    samples and counts them.
    """

    streamed = False

    def __init__(self, resolution, batch_size, world_size=1, rank=0, seed=0, center_crop=False, random_flip=False,
                 num_workers=0, max_tries=MAX_TRIES, flag="--train_data_dir"):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} / world_size {world_size} / rank {rank}")
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.num_workers = int(num_workers)
        self.max_tries = int(max_tries)
        self.flag = flag
        self.skipped = 0  # slots whose sample was unreadable and replaced (each time it happened)
        self.images_decoded = 0
        self.unreadable = {}  # name -> reason, for every bad sample met
        self._bad_ids = set()
        self._pool = None
        self._lock = threading.Lock()

    @property
    def global_batch_size(self):
        return self.batch_size * self.world_size

    # -- per sample ---------------------------------------------------------------------------------
    def load_sample(self, ref, epoch):
        """Read, decode and preprocess one sample (raises UnreadableSample)."""
        return self._decode(self._read(ref), epoch)

    def _decode(self, raw, epoch):
        sample_id, image_data, caption_value, name = raw
        caption = caption_text(caption_value, sample_generator(self.seed, epoch, sample_id, "caption"), name)
        image = decode_image(image_data, name)
        pixels = preprocess_image(image, self.resolution, self.center_crop, self.random_flip,
                                  sample_generator(self.seed, epoch, sample_id, "augment"))
        with self._lock:
            self.images_decoded += 1
        return Sample(sample_id, name, caption, pixels)

    def _note_unreadable(self, sample_id, error):
        with self._lock:
            self.skipped += 1
            if error is None:  # known bad: counted again, named once
                return
            self._bad_ids.add(sample_id)
            self.unreadable[error.name] = error.reason
        logger.warning(f"unreadable sample skipped (the next readable one takes its place): {error.name} ({error.reason})")

    def _fetch(self, ref):
        """The raw sample (read in the calling thread: readers need not be thread-safe), or None if bad."""
        sample_id = self._ref_id(ref)
        if sample_id in self._bad_ids:
            self._note_unreadable(sample_id, None)
            return None
        try:
            return self._read(ref)
        except UnreadableSample as error:
            self._note_unreadable(sample_id, error)
            return None

    def _decode_or_none(self, raw, epoch):
        if raw is None:
            return None
        try:
            return self._decode(raw, epoch)
        except UnreadableSample as error:
            self._note_unreadable(raw[0], error)
            return None

    def _try(self, ref, epoch):
        return self._decode_or_none(self._fetch(ref), epoch)

    def _replacement(self, positions, position, epoch):
        tried, forward, backward = 1, position + 1, position - 1
        while tried < self.max_tries:
            ref = positions.get(forward) if forward is not None else None
            if ref is None:
                forward = None
                if backward < 0:
                    break
                ref = positions.get(backward)
                backward -= 1
            else:
                forward += 1
            tried += 1
            sample = self._try(ref, epoch)
            if sample is not None:
                return sample
        raise ImageDataError(
            f"{self.flag}: {tried} samples in a row around position {position} of epoch {epoch} are unreadable "
            f"(e.g. {next(reversed(self.unreadable), '?')}): check the data"
        )

    def _load_slots(self, positions, slots, epoch):
        raws = [self._fetch(positions.get(p)) for p in slots]
        if self.num_workers > 0:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="image-decode")
            samples = list(self._pool.map(lambda raw: self._decode_or_none(raw, epoch), raws))
        else:
            samples = [self._decode_or_none(raw, epoch) for raw in raws]
        # Replacements in slot order, after the first attempts: the same choices with or without threads.
        return [s if s is not None else self._replacement(positions, p, epoch) for s, p in zip(samples, slots)], \
            sum(s is None for s in samples)

    # -- batches ------------------------------------------------------------------------------------
    def batches(self, start_batch=0):
        """Yield :class:`ImageBatch` forever, starting after ``start_batch`` batches (the number consumed)."""
        epoch, offset = self._locate(start_batch)
        size, first = self.batch_size, self.rank * self.batch_size
        try:
            while True:
                positions = self._epoch_positions(epoch)
                batch_index = offset
                while True:
                    start = batch_index * self.global_batch_size
                    positions.release(start)
                    if positions.get(start + self.global_batch_size - 1) is None:
                        break
                    samples, skipped = self._load_slots(positions, range(start + first, start + first + size), epoch)
                    yield ImageBatch(epoch, batch_index, [s.id for s in samples], [s.caption for s in samples],
                                     torch.stack([s.pixel_values for s in samples]), skipped)
                    batch_index += 1
                self._epoch_ended(positions, batch_index)
                epoch, offset = epoch + 1, 0
        finally:  # closing the batches stops the decode threads
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class ImageDatasetSource(ImageBatchSource):
    """Map-style data (a ``datasets.Dataset``, e.g. from imagefolder): rows read by index, in the prompt
    sampler's permutation of each epoch."""

    def __init__(self, dataset, image_column, caption_column, resolution, batch_size, world_size=1, rank=0, seed=0,
                 center_crop=False, random_flip=False, num_workers=0, max_tries=MAX_TRIES, flag="--train_data_dir"):
        super().__init__(resolution, batch_size, world_size, rank, seed, center_crop, random_flip, num_workers,
                         max_tries, flag)
        self.dataset = prepare_dataset(dataset, image_column, caption_column)
        self.image_column, self.caption_column = image_column, caption_column
        self.num_samples = len(self.dataset)
        self.batches_per_epoch = self.num_samples // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ImageDataError(
                f"{flag} holds {self.num_samples} samples, fewer than one global batch "
                f"({batch_size} x {world_size} processes): lower --train_batch_size or add images"
            )

    def epoch_order(self, epoch):
        from yoso.data.prompts import ShardedPromptSampler

        return ShardedPromptSampler(self.num_samples, 1, 1, 0, self.seed).epoch_order(epoch)  # int64, 8 bytes a row

    def _epoch_positions(self, epoch):
        return _OrderPositions(self.epoch_order(epoch))

    def _locate(self, start_batch):
        return divmod(start_batch, self.batches_per_epoch)

    def _epoch_ended(self, positions, batches):
        pass

    def _ref_id(self, row):
        return int(row)

    def _read(self, row):
        record = self.dataset[int(row)]
        image = record[self.image_column]
        path = image.get("path") if isinstance(image, dict) else image if isinstance(image, (str, Path)) else None
        name = Path(path).name if path else f"row {row}"
        return int(row), image, record[self.caption_column], name


class StreamedImageSource(ImageBatchSource):
    """Streamed data read shard by shard, never held whole: ``shards`` gives ``num_shards``,
    ``records(shard)`` (a lazy iterator) and ``read(record) -> (image, caption, name)``
    (``yoso.data.tar_shards.TarShards``, ``DatasetStreamShards``).

    An epoch reads the shards in an order permuted by (seed, epoch) through a shuffle buffer of
    ``shuffle_buffer_size`` records seeded by (seed, epoch). With ``max_train_samples`` every epoch holds
    the same subset, picked as ``IterableDataset.shuffle(seed).take(n)`` picks it (a stream cannot be
    permuted whole): the first n records of the shards in an order permuted by the seed alone, through a
    shuffle buffer seeded by it alone; the epoch's buffer then shuffles them.
    """

    streamed = True
    batches_per_epoch = None  # unknown before a full pass; training needs --max_train_steps

    def __init__(self, shards, resolution, batch_size, world_size=1, rank=0, seed=0, center_crop=False,
                 random_flip=False, shuffle_buffer_size=DEFAULT_SHUFFLE_BUFFER_SIZE, max_train_samples=None,
                 num_workers=0, max_tries=MAX_TRIES, flag="--train_data_dir"):
        super().__init__(resolution, batch_size, world_size, rank, seed, center_crop, random_flip, num_workers,
                         max_tries, flag)
        if shuffle_buffer_size < 1:
            raise ImageDataError(f"--shuffle_buffer_size {shuffle_buffer_size}: must be at least 1")
        self.shards = shards
        self.shuffle_buffer_size = int(shuffle_buffer_size)
        self.max_train_samples = max_train_samples
        self.samples_per_epoch = None  # learnt at the end of the first full pass
        self.records_scanned = 0

    def shard_order(self, epoch):
        order = list(range(self.shards.num_shards))
        # With --max_train_samples the subset is the seed's alone: the same shard order every epoch.
        subset = self.max_train_samples is not None
        random.Random(sample_seed(self.seed, -1 if subset else epoch, -1, "subset shards" if subset else "shards")
                      ).shuffle(order)
        return order

    def epoch_records(self, epoch):
        """(id, record) in the epoch's order: shards in ``shard_order``, through the shuffle buffer."""

        def natural():
            for shard in self.shard_order(epoch):
                for position, record in enumerate(self.shards.records(shard)):
                    if position >> SHARD_ID_SHIFT:
                        raise ImageDataError(f"{self.flag}: shard {shard} holds over 2^{SHARD_ID_SHIFT} samples")
                    self.records_scanned += 1
                    yield (shard << SHARD_ID_SHIFT) | position, record

        records = natural()
        if self.max_train_samples is not None:
            subset_rng = random.Random(sample_seed(self.seed, -1, -1, "subset buffer"))
            records = itertools.islice(shuffle_buffer(records, self.shuffle_buffer_size, subset_rng),
                                       self.max_train_samples)
        return shuffle_buffer(records, self.shuffle_buffer_size, random.Random(sample_seed(self.seed, epoch, -1, "buffer")))

    def _progress(self, total):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="resuming: skipping consumed samples", unit="sample",
                    disable=self.rank != 0 or total < 10_000)

    def _epoch_positions(self, epoch):
        # Replacement candidates reach max_tries below a slot; keep that much history.
        return _StreamWindow(self.epoch_records(epoch), keep=self.max_tries + self.global_batch_size,
                             progress=self._progress)

    def _learn_epoch_size(self):
        from tqdm.auto import tqdm

        with tqdm(desc="resuming: counting the stream's samples", unit="sample", disable=self.rank != 0) as bar:
            count = 0
            for _ in self.epoch_records(0):
                count += 1
                bar.update(1)
        self._set_epoch_size(count)

    def _set_epoch_size(self, count):
        self.samples_per_epoch = count
        if count < self.global_batch_size:
            raise ImageDataError(
                f"{self.flag} holds {count} samples, fewer than one global batch "
                f"({self.batch_size} x {self.world_size} processes): lower --train_batch_size or add images"
            )

    def _locate(self, start_batch):
        if start_batch == 0:
            return 0, 0
        if self.samples_per_epoch is None:
            self._learn_epoch_size()
        return divmod(start_batch, self.samples_per_epoch // self.global_batch_size)

    def _epoch_ended(self, positions, batches):
        if positions.length is not None and self.samples_per_epoch is None:
            self._set_epoch_size(positions.length)
        if batches == 0:  # (only reachable if the stream shrank between epochs)
            raise ImageDataError(f"{self.flag}: an epoch of the stream yielded no full global batch")

    def _ref_id(self, ref):
        return ref[0]

    def _read(self, ref):
        sample_id, record = ref
        image, caption, name = self.shards.read(record)
        return sample_id, image, caption, name or f"sample {sample_id >> SHARD_ID_SHIFT}:{sample_id & 0xFFFFFFFF}"


def shuffle_buffer(items, buffer_size, rng):
    """The usual streaming shuffle: fill a buffer, then emit a random element and put the next item in its
    place; at the end emit the rest in random order. Deterministic given ``rng``'s seed."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class DatasetStreamShards:
    """A ``datasets.IterableDataset`` (``streaming=True``) read one data shard at a time, so that sample ids
    (shard, position) are stable and the shard order can change per epoch. Every rank reads every record's
    bytes (a stream cannot seek); only its own samples are decoded."""

    def __init__(self, dataset, image_column, caption_column):
        self.dataset = prepare_dataset(dataset, image_column, caption_column)
        self.image_column, self.caption_column = image_column, caption_column

    @property
    def num_shards(self):
        return self.dataset.num_shards

    def records(self, shard):
        if self.num_shards == 1:
            return iter(self.dataset)
        return iter(self.dataset.shard(num_shards=self.num_shards, index=shard))

    def read(self, record):
        image = record[self.image_column]
        path = image.get("path") if isinstance(image, dict) else None
        return image, record[self.caption_column], Path(path).name if path else None


def prepare_dataset(dataset, image_column, caption_column):
    """Keep the two columns, and have the image column hand over undecoded bytes/paths (decoded here, so that
    a corrupt file is skipped rather than raised by datasets)."""
    if not hasattr(dataset, "cast_column"):
        return dataset
    from datasets import Image

    dataset = dataset.select_columns([image_column, caption_column])
    features = getattr(dataset, "features", None)
    if features is not None and isinstance(features.get(image_column), Image):
        dataset = dataset.cast_column(image_column, Image(decode=False))
    return dataset


# --------------------------------------------------------------------------------------------------
# From the command line: route, preflight, opening
# --------------------------------------------------------------------------------------------------

def image_data_route(args):
    """Which data the flags select: ROUTE_PROMPTS (no image flags), ROUTE_TAR, ROUTE_DATASET, ROUTE_DATASET_STREAM."""
    name, folder = getattr(args, "dataset_name", None), getattr(args, "train_data_dir", None)
    if not name and not folder:
        return ROUTE_PROMPTS
    if folder and not name and Path(folder).is_dir() and find_tar_shards(folder):
        return ROUTE_TAR
    return ROUTE_DATASET_STREAM if getattr(args, "streaming", False) else ROUTE_DATASET


def uses_image_data(args):
    return image_data_route(args) != ROUTE_PROMPTS


def resolve_caption_column(args):
    """``--caption_column`` as given, else the route's default: "prompt" for prompt files, "txt" for tar
    shards, "text" (diffusers' default) for datasets."""
    if getattr(args, "caption_column", None):
        return args.caption_column
    route = image_data_route(args)
    if route == ROUTE_PROMPTS:
        return DEFAULT_PROMPT_CAPTION_COLUMN
    return DEFAULT_TAR_CAPTION_COLUMN if route == ROUTE_TAR else DEFAULT_DATASET_CAPTION_COLUMN


def _image_column(args):
    return getattr(args, "image_column", None) or DEFAULT_IMAGE_COLUMN


def _data_flag(args):
    if getattr(args, "dataset_name", None):
        return f"--dataset_name {args.dataset_name}"
    return f"--train_data_dir {args.train_data_dir}"


def load_image_dataset(args, streaming):
    """The "train" split through ``datasets.load_dataset`` (imagefolder for ``--train_data_dir``)."""
    import warnings

    from datasets import load_dataset

    cache_dir = getattr(args, "cache_dir", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if getattr(args, "dataset_name", None):
                return load_dataset(args.dataset_name, getattr(args, "dataset_config_name", None), split="train",
                                    streaming=streaming, cache_dir=cache_dir)
            return load_dataset("imagefolder", data_dir=args.train_data_dir, split="train", streaming=streaming,
                                cache_dir=cache_dir)
    except Exception as error:  # datasets and the hub client raise many types; all mean "cannot use it"
        raise ImageDataError(f"{_data_flag(args)}: cannot load the dataset's train split ({first_line(error)})") from None


class ImageDataInfo(NamedTuple):
    route: str
    image_column: str
    caption_column: str
    columns: list


def check_image_data(args):
    """Preflight for image data, before any model loads: flags, the dataset's columns (from its features or
    first record only) and the streamed routes' need for ``--max_train_steps``. Returns an
    :class:`ImageDataInfo`; raises :class:`ImageDataError` with a one-line message naming the flag."""
    name, folder = getattr(args, "dataset_name", None), getattr(args, "train_data_dir", None)
    if name and folder:
        raise ImageDataError("--dataset_name and --train_data_dir both given: use one of them")
    route = image_data_route(args)
    if route == ROUTE_PROMPTS:
        raise ImageDataError("no image data: give --dataset_name or --train_data_dir")
    if folder and not Path(folder).is_dir():
        raise ImageDataError(f"--train_data_dir {folder}: no such folder (images with a metadata.jsonl, or .tar shards)")
    if getattr(args, "shuffle_buffer_size", DEFAULT_SHUFFLE_BUFFER_SIZE) < 1:
        raise ImageDataError(f"--shuffle_buffer_size {args.shuffle_buffer_size}: must be at least 1")
    if route in STREAMED_ROUTES and getattr(args, "max_train_steps", None) is None:
        kind = "tar shards" if route == ROUTE_TAR else "--streaming"
        raise ImageDataError(f"{_data_flag(args)} ({kind}) is streamed and its length unknown: give --max_train_steps "
                             "(--num_train_epochs needs a map-style dataset)")
    image_column, caption_column = _image_column(args), resolve_caption_column(args)
    if route == ROUTE_TAR:
        columns = _check_tar_columns(args, image_column, caption_column)
    else:
        columns = _check_dataset_columns(args, image_column, caption_column)
    return ImageDataInfo(route, image_column, caption_column, columns)


def _check_tar_columns(args, image_column, caption_column):
    shards = find_tar_shards(args.train_data_dir)
    path, sample = first_sample(shards)
    if sample is None:
        raise ImageDataError(f"--train_data_dir {args.train_data_dir}: its {len(shards)} .tar files hold no samples")
    extensions, json_fields = sample_columns(path, sample)
    listed = ", ".join(extensions) + (f" (.json fields: {', '.join(json_fields)})" if json_fields else "")
    where = f"--train_data_dir {args.train_data_dir}: sample {sample.key} of {path.name} has members {listed}"
    if resolve_image_extension(sample.members, image_column) is None:
        hint = f"one of {', '.join(IMAGE_EXTENSIONS)}" if image_column == GENERIC_IMAGE_COLUMN else f".{image_column}"
        raise ImageDataError(f"--image_column {image_column}: no image member ({hint}); {where}")
    if caption_column not in extensions and caption_column not in json_fields:
        raise ImageDataError(f"--caption_column {caption_column}: no such member or .json field; {where}")
    return extensions + json_fields


def _check_dataset_columns(args, image_column, caption_column):
    from datasets import Image

    dataset = load_image_dataset(args, streaming=True)  # reads metadata / one shard's head, not the data
    features = dataset.features
    if features is None:
        try:
            first = next(iter(dataset))
        except StopIteration:
            raise ImageDataError(f"{_data_flag(args)}: the train split is empty") from None
        except Exception as error:
            raise ImageDataError(f"{_data_flag(args)}: cannot read its first record ({first_line(error)})") from None
        columns, image_feature = list(first), None
    else:
        columns, image_feature = list(features), features.get(image_column)
    where = f"{_data_flag(args)} has columns {', '.join(columns)}"
    if image_column not in columns:
        raise ImageDataError(f"--image_column {image_column}: no such column; {where}")
    if caption_column not in columns:
        raise ImageDataError(f"--caption_column {caption_column}: no such column; {where}")
    if image_feature is not None and not isinstance(image_feature, Image):
        raise ImageDataError(f"--image_column {image_column}: the column holds {image_feature}, not images; {where}")
    return columns


def open_image_source(args, rank=0, world_size=1):
    """The batch source for this rank, from the same flags ``check_image_data`` checked. Map-style datasets
    are loaded (and, the first time, prepared in datasets' cache: call it on the main process first)."""
    info = check_image_data(args)
    common = dict(resolution=args.resolution, batch_size=args.train_batch_size, world_size=world_size, rank=rank,
                  seed=args.seed, center_crop=getattr(args, "center_crop", False),
                  random_flip=getattr(args, "random_flip", False),
                  num_workers=getattr(args, "dataloader_num_workers", 0) or 0, flag=_data_flag(args))
    max_samples = getattr(args, "max_train_samples", None)
    if info.route == ROUTE_DATASET:
        dataset = load_image_dataset(args, streaming=False)
        if max_samples is not None:
            # diffusers' examples: shuffle with the seed, then select (a random subset, not the first rows).
            dataset = dataset.shuffle(seed=args.seed).select(range(min(max_samples, len(dataset))))
        return ImageDatasetSource(dataset, info.image_column, info.caption_column, **common)
    if info.route == ROUTE_TAR:
        shards = TarShards(find_tar_shards(args.train_data_dir), info.image_column, info.caption_column)
    else:
        shards = DatasetStreamShards(load_image_dataset(args, streaming=True), info.image_column, info.caption_column)
    return StreamedImageSource(shards, shuffle_buffer_size=getattr(args, "shuffle_buffer_size", DEFAULT_SHUFFLE_BUFFER_SIZE),
                               max_train_samples=max_samples, **common)


def prefetch(iterator, depth=2):
    """Run ``iterator`` ``depth`` items ahead in a background thread (image decoding overlaps the step);
    yields the same items in the same order, and re-raises its exception in the caller."""
    import atexit
    import queue

    items = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry):
        """Put ``entry`` when there is room; False once the consumer has stopped (nobody would take it)."""
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                if not offer((item, None)):
                    return
        except BaseException as error:  # handed to the consumer
            offer((done, error))
            return
        finally:
            if hasattr(iterator, "close"):
                iterator.close()  # in this thread: the source's own threads stop with it
        offer((done, None))

    def stop_and_join():
        stop.set()
        thread.join()

    thread = threading.Thread(target=produce, name="image-prefetch", daemon=True)
    thread.start()
    # A program that ends without closing this generator (an exception past the training loop) collects it only
    # while the interpreter finalizes, when a daemon thread can no longer run: one still decoding is then killed
    # inside torch's C++ code and aborts the process ("terminate called without an active exception"). atexit
    # runs before that, while the thread can still finish its item and stop.
    atexit.register(stop_and_join)
    try:
        while True:
            item, error = items.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        # Stop and join the producer when the consumer is done (or closes this generator): a daemon thread
        # still decoding when the interpreter exits aborts the process ("terminate called without an active
        # exception") after the run's outputs are written.
        stop_and_join()
        atexit.unregister(stop_and_join)
