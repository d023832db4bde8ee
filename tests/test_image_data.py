"""Real image-caption data (yoso/data/image_data.py, yoso/data/tar_shards.py): pixels, order, sharding, resume,
bad samples, preflight errors, the streamed tar route, and the VAE latents."""

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from yoso.data.image_data import (
    ImageDataError,
    StreamedImageSource,
    check_image_data,
    encode_images,
    latent_generators,
    open_image_source,
    prefetch,
    resolve_caption_column,
)
from yoso.data.image_processing import crop_and_flip, preprocess_image, sample_generator

RES = 16
NUM_SAMPLES = 13


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_samples(n, seed=0, corrupt=()):
    """(key, image bytes, caption): random RGB images of assorted sizes; ``corrupt`` maps index -> kind."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        height, width = (int(s) for s in rng.integers(12, 40, size=2))
        data = png_bytes(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        kind = dict(corrupt).get(i)
        if kind == "garbage":
            data = b"this is not an image"
        elif kind == "truncated":
            data = data[: len(data) // 2]
        samples.append((f"{i:03d}", data, f"caption number {i}"))
    return samples


def write_folder(folder, samples):
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as handle:
        for key, data, caption in samples:
            (folder / f"{key}.png").write_bytes(data)
            handle.write(json.dumps({"file_name": f"{key}.png", "text": caption}) + "\n")
    return folder


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_tars(folder, samples, shard_sizes):
    folder.mkdir(parents=True)
    start = 0
    for shard, size in enumerate(shard_sizes):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for key, data, caption in samples[start : start + size]:
                _add(tar, f"{key}.png", data)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"caption": caption, "key": key}).encode())
        start += size
    return folder


def make_args(tmp, **overrides):
    args = dict(dataset_name=None, dataset_config_name=None, train_data_dir=None, image_column="image",
                caption_column=None, resolution=RES, train_batch_size=2, seed=3, center_crop=False, random_flip=True,
                max_train_steps=100, max_train_samples=None, streaming=False, shuffle_buffer_size=5,
                cache_dir=str(tmp / "datasets-cache"), dataloader_num_workers=0)
    args.update(overrides)
    return SimpleNamespace(**args)


def take(source, n, start=0):
    batches = source.batches(start_batch=start)
    return [next(batches) for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_data")
    good = make_samples(NUM_SAMPLES)
    bad = make_samples(NUM_SAMPLES, seed=1, corrupt={4: "garbage", 9: "truncated"})
    return SimpleNamespace(
        root=root,
        samples=good,
        folder=write_folder(root / "folder", good),
        one_tar=write_tars(root / "one_tar", good, [NUM_SAMPLES]),
        tars=write_tars(root / "tars", good, [5, 4, 4]),
        bad_folder=write_folder(root / "bad_folder", bad),
        bad_tars=write_tars(root / "bad_tars", bad, [7, 6]),
    )


@pytest.fixture(scope="module")
def vae():
    from yoso.testing import make_vae

    return make_vae(0, RES)


# ---- pixels -----------------------------------------------------------------------------------------

def reference_pixels(array, resolution, top, left, flip):
    """Straight-line reference: PIL bilinear resize of the shorter side, numpy crop and flip, to [-1, 1]."""
    height, width = array.shape[:2]
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    image = Image.fromarray(array)
    if size != (width, height):
        image = image.resize(size, Image.BILINEAR)
    x = np.asarray(image).astype(np.float64)[top : top + resolution, left : left + resolution]
    if flip:
        x = x[:, ::-1]
    return torch.from_numpy((x / 255.0 - 0.5) / 0.5).permute(2, 0, 1).float()


@pytest.mark.parametrize("shape", [(23, 40), (41, 20), (16, 16), (12, 30)])
@pytest.mark.parametrize("center_crop,random_flip", [(True, False), (False, True), (False, False)])
def test_resize_crop_flip_match_a_numpy_reference(shape, center_crop, random_flip):
    array = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for sample_id in range(6):
        got = preprocess_image(Image.fromarray(array), RES, center_crop, random_flip, sample_generator(7, 1, sample_id, "augment"))
        # The documented decisions, recomputed from the same generator: three float64 uniforms.
        u_top, u_left, u_flip = torch.rand(3, generator=sample_generator(7, 1, sample_id, "augment"), dtype=torch.float64).tolist()
        height, width = shape
        resized = (RES, int(RES * height / width)) if width <= height else (int(RES * width / height), RES)
        if center_crop:
            top, left = round((resized[1] - RES) / 2), round((resized[0] - RES) / 2)
        else:
            top, left = int(u_top * (resized[1] - RES + 1)), int(u_left * (resized[0] - RES + 1))
        want = reference_pixels(array, RES, top, left, random_flip and u_flip < 0.5)
        assert got.shape == (3, RES, RES) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert -1.0 <= got.min() and got.max() <= 1.0


def test_center_crop_offsets_and_exact_pixels():
    # torchvision's numbers: 40x23 -> 27x16, left = round(5.5) = 6; 20x41 -> 16x32, top = 8.
    assert crop_and_flip(27, 16, RES, True, False, torch.Generator().manual_seed(0)) == (0, 6, False)
    assert crop_and_flip(16, 32, RES, True, False, torch.Generator().manual_seed(0)) == (8, 0, False)
    # An image already at the resolution is not resampled: exactly x / 127.5 - 1, mirrored when flipped.
    array = np.arange(RES * RES * 3, dtype=np.uint8).reshape(RES, RES, 3)
    plain = preprocess_image(Image.fromarray(array), RES, True, False, torch.Generator().manual_seed(0))
    exact = torch.from_numpy(array.astype(np.float64) / 127.5 - 1).permute(2, 0, 1).float()
    torch.testing.assert_close(plain, exact, rtol=0, atol=1e-6)
    flipped = next(preprocess_image(Image.fromarray(array), RES, True, True, sample_generator(0, 0, i, "augment"))
                   for i in range(100) if crop_and_flip(RES, RES, RES, True, True, sample_generator(0, 0, i, "augment"))[2])
    torch.testing.assert_close(flipped, exact.flip(-1), rtol=0, atol=1e-6)


def test_random_crops_cover_every_offset_and_flip_half_the_time():
    tops, flips = [], 0
    for sample_id in range(400):
        top, left, flip = crop_and_flip(16, 24, RES, False, True, sample_generator(5, 0, sample_id, "augment"))
        assert left == 0
        tops.append(top)
        flips += flip
    assert sorted(set(tops)) == list(range(9))  # 24 - 16 + 1 offsets
    assert 160 <= flips <= 240


# ---- order, sharding, resume ------------------------------------------------------------------------

ROUTES = {
    "folder": lambda d, tmp, **kw: make_args(tmp, train_data_dir=str(d.folder), **kw),
    "tar": lambda d, tmp, **kw: make_args(tmp, train_data_dir=str(d.tars), **kw),
    "stream": lambda d, tmp, **kw: make_args(tmp, train_data_dir=str(d.folder), streaming=True, **kw),
}


@pytest.mark.parametrize("route", ["folder", "tar"])
def test_two_ranks_together_see_exactly_what_one_rank_sees(data, tmp_path, route):
    one = open_image_source(ROUTES[route](data, tmp_path, train_batch_size=4), rank=0, world_size=1)
    ranks = [open_image_source(ROUTES[route](data, tmp_path, train_batch_size=2), rank=r, world_size=2) for r in range(2)]
    whole = take(one, 6)  # 13 samples, global batch 4: 3 batches an epoch, so 2 epochs
    parts = [take(source, 6) for source in ranks]
    assert [(b.epoch, b.batch_in_epoch) for b in whole] == [(e, b) for e in range(2) for b in range(3)]
    for g, batch in enumerate(whole):
        assert [(p[g].epoch, p[g].batch_in_epoch) for p in parts] == [(batch.epoch, batch.batch_in_epoch)] * 2
        assert parts[0][g].ids + parts[1][g].ids == batch.ids
        assert parts[0][g].captions + parts[1][g].captions == batch.captions
        assert torch.equal(torch.cat([parts[0][g].pixel_values, parts[1][g].pixel_values]), batch.pixel_values)
    for epoch in range(2):
        seen = [i for p in parts for b in p if b.epoch == epoch for i in b.ids]
        assert len(seen) == len(set(seen)) == 12  # disjoint; one sample of 13 left over (incomplete batch dropped)
    assert [b.ids for b in whole[:3]] != [b.ids for b in whole[3:]]  # a new order every epoch
    offsets = [0, 5, 9]  # the tar route's shards hold 5, 4, 4 samples; an id is shard << 32 | position
    row = (lambda i: i) if route == "folder" else (lambda i: offsets[i >> 32] + (i & 0xFFFFFFFF))
    assert all(c == data.samples[row(i)][2] for b in whole for i, c in zip(b.ids, b.captions))


@pytest.mark.parametrize("route", ["folder", "tar"])
def test_resume_from_batch_k_is_the_tail_of_the_uninterrupted_run(data, tmp_path, route, vae):
    def latents(batch):
        return encode_images(vae, batch.pixel_values, latent_generators(3, batch.epoch, batch.ids))

    for rank in range(2):
        args = ROUTES[route](data, tmp_path, train_batch_size=2)
        full = take(open_image_source(args, rank=rank, world_size=2), 8)  # 3 batches an epoch: into epoch 2
        resumed = take(open_image_source(args, rank=rank, world_size=2), 4, start=4)  # a fresh process
        for a, b in zip(full[4:], resumed):
            assert (a.epoch, a.batch_in_epoch, a.ids, a.captions) == (b.epoch, b.batch_in_epoch, b.ids, b.captions)
            assert torch.equal(a.pixel_values, b.pixel_values)
            assert torch.equal(latents(a), latents(b))


def test_streamed_dataset_route_matches_the_map_style_route_per_sample(data, tmp_path):
    """datasets' streaming=True imagefolder (one data shard) gives each row the same id, pixels and caption."""
    mapped = take(open_image_source(ROUTES["folder"](data, tmp_path), 0, 1), 12)
    streamed_source = open_image_source(ROUTES["stream"](data, tmp_path), 0, 1)
    assert isinstance(streamed_source, StreamedImageSource)
    streamed = take(streamed_source, 12)
    for epoch in range(2):
        a = {i: (c, p) for b in mapped if b.epoch == epoch for i, c, p in zip(b.ids, b.captions, b.pixel_values)}
        b_ = {i: (c, p) for b in streamed if b.epoch == epoch for i, c, p in zip(b.ids, b.captions, b.pixel_values)}
        common = set(a) & set(b_)
        assert len(common) >= 11  # each drops one (different) sample as the incomplete batch
        for i in common:
            assert a[i][0] == b_[i][0] == f"caption number {i}"
            assert torch.equal(a[i][1], b_[i][1])


def test_dataset_name_parquet_map_style_and_streamed_shard_by_shard(data, tmp_path):
    """--dataset_name on a local folder of two parquet files (a hub dataset's layout): map-style rows and the
    --streaming route (read data shard by shard; id = shard << 32 | position) give the same samples, and the
    streamed route shards over ranks like the others."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"), "extra": datasets.Value("int64")})
    rows = [{"image": {"bytes": image, "path": None}, "text": caption, "extra": i} for i, (_, image, caption) in enumerate(data.samples)]
    (tmp_path / "pq" / "data").mkdir(parents=True)
    for shard, part in enumerate([rows[:6], rows[6:]]):
        datasets.Dataset.from_list(part, features=features).to_parquet(str(tmp_path / "pq" / "data" / f"train-0000{shard}-of-00002.parquet"))
    flags = dict(dataset_name=str(tmp_path / "pq"), center_crop=True, random_flip=False)
    mapped = take(open_image_source(make_args(tmp_path, train_batch_size=1, **flags), 0, 1), NUM_SAMPLES)
    streamed_source = open_image_source(make_args(tmp_path, train_batch_size=1, streaming=True, **flags), 0, 1)
    assert streamed_source.shards.num_shards == 2
    streamed = take(streamed_source, NUM_SAMPLES)
    row = lambda i: [0, 6][i >> 32] + (i & 0xFFFFFFFF)  # noqa: E731 (a row map, like the identity beside it)
    by_row = [{r(b.ids[0]): (b.captions[0], b.pixel_values) for b in batches}
              for r, batches in (((lambda i: i), mapped), (row, streamed))]
    assert sorted(by_row[0]) == sorted(by_row[1]) == list(range(NUM_SAMPLES))
    for r in range(NUM_SAMPLES):
        assert by_row[0][r][0] == by_row[1][r][0] == data.samples[r][2]
        assert torch.equal(by_row[0][r][1], by_row[1][r][1])
    whole = take(open_image_source(make_args(tmp_path, train_batch_size=4, streaming=True, **flags), 0, 1), 4)
    parts = [take(open_image_source(make_args(tmp_path, train_batch_size=2, streaming=True, **flags), r, 2), 4) for r in range(2)]
    for g, batch in enumerate(whole):
        assert parts[0][g].ids + parts[1][g].ids == batch.ids
        assert torch.equal(torch.cat([parts[0][g].pixel_values, parts[1][g].pixel_values]), batch.pixel_values)


def test_tar_route_yields_the_folder_samples(data, tmp_path, vae):
    """Same files as a folder and as one tar shard: the same ids (row = position in the shard), captions,
    pixels and latents per (epoch, id); only the order differs (a permutation vs. a shuffle buffer)."""
    folder = open_image_source(ROUTES["folder"](data, tmp_path, train_batch_size=1), 0, 1)
    tar = open_image_source(make_args(tmp_path, train_data_dir=str(data.one_tar), train_batch_size=1), 0, 1)
    by_id = {}
    for source in (folder, tar):
        seen = {}
        for batch in take(source, NUM_SAMPLES):  # batch 1: one full epoch, nothing dropped
            (i,) = batch.ids
            seen[i] = (batch.captions[0], batch.pixel_values, encode_images(vae, batch.pixel_values, latent_generators(3, 0, [i])))
        by_id[source] = seen
    a, b = by_id[folder], by_id[tar]
    assert sorted(a) == sorted(b) == list(range(NUM_SAMPLES))
    for i in a:
        assert a[i][0] == b[i][0] == data.samples[i][2]
        assert torch.equal(a[i][1], b[i][1])
        assert torch.equal(a[i][2], b[i][2])
    # The json member is a caption column too.
    via_json = open_image_source(make_args(tmp_path, train_data_dir=str(data.one_tar), caption_column="caption"), 0, 1)
    batch = take(via_json, 1)[0]
    assert batch.captions == [data.samples[i][2] for i in batch.ids]


def test_tar_reader_is_lazy(data, tmp_path):
    """A rank scans tar headers only as far as the shuffle buffer needs, and reads its own samples' bytes only."""
    args = make_args(tmp_path, train_data_dir=str(data.tars), shuffle_buffer_size=3, train_batch_size=2)
    source = open_image_source(args, rank=1, world_size=2)
    batches = source.batches()
    first = next(batches)
    assert source.records_scanned <= 3 + 4 + 1  # buffer + one global batch (+1 look-ahead), of 13
    assert source.images_decoded == 2
    sizes = {}
    start = 0
    for shard, count in enumerate([5, 4, 4]):
        for position in range(count):
            _, image, caption = data.samples[start + position]
            sizes[(shard << 32) | position] = len(image) + len(caption.encode())
        start += count
    assert source.shards.bytes_read == sum(sizes[i] for i in first.ids)
    assert all(i in sizes for i in first.ids)


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["bad_folder", "bad_tars"])
def test_unreadable_images_are_skipped_counted_and_named(data, tmp_path, route, caplog):
    folder = str(getattr(data, route))
    caplog.set_level(logging.WARNING, logger="yoso.data.image_data")
    one = open_image_source(make_args(tmp_path, train_data_dir=folder, train_batch_size=4), 0, 1)
    ranks = [open_image_source(make_args(tmp_path, train_data_dir=folder, train_batch_size=2), r, 2) for r in range(2)]
    whole = take(one, 9)  # three epochs: each meets both bad files
    parts = [take(source, 9) for source in ranks]
    bad_ids = {4, 9} if route == "bad_folder" else {4, 1 << 32 | 2}  # tars of 7 + 6: sample 9 is shard 1, position 2
    for g, batch in enumerate(whole):
        assert [(p[g].epoch, p[g].batch_in_epoch) for p in parts] == [(batch.epoch, batch.batch_in_epoch)] * 2
        assert parts[0][g].ids + parts[1][g].ids == batch.ids  # the same replacements, whatever the sharding
        assert torch.equal(torch.cat([parts[0][g].pixel_values, parts[1][g].pixel_values]), batch.pixel_values)
        assert not bad_ids & set(batch.ids) and len(batch.ids) == 4
    assert one.skipped >= 2 and ranks[0].skipped + ranks[1].skipped == one.skipped
    assert len(one.unreadable) == 2
    names = {"004.png", "009.png"} if route == "bad_folder" else {"shard-000.tar:004.png", "shard-001.tar:009.png"}
    assert set(one.unreadable) == names
    logged = [r.getMessage() for r in caplog.records if "unreadable sample skipped" in r.getMessage()]
    for name in names:
        assert any(name in line for line in logged)


def test_truncated_tar_shard_is_read_up_to_the_cut(data, tmp_path, caplog):
    """An interrupted download: shard 1 ends inside its first image. Its loss is logged, the sample with the
    cut image is skipped like a corrupt one, and the run goes on with the other shard."""
    folder = write_tars(tmp_path / "cut", data.samples, [7, 6])
    shard = folder / "shard-001.tar"
    shard.write_bytes(shard.read_bytes()[: 512 + len(data.samples[7][1]) // 2])
    caplog.set_level(logging.WARNING)
    source = open_image_source(make_args(tmp_path, train_data_dir=str(folder), train_batch_size=2), 0, 1)
    batches = take(source, 8)
    assert source.samples_per_epoch == 8  # 7 + the cut sample, which still holds a place in the order
    assert {i for b in batches for i in b.ids} == set(range(7))
    assert list(source.unreadable) == ["shard-001.tar:007.png"] and "truncated" in source.unreadable["shard-001.tar:007.png"]
    assert any("tar shard" in r.getMessage() and "shard-001.tar" in r.getMessage() for r in caplog.records)


def one_line_error(args):
    with pytest.raises(ImageDataError) as raised:
        check_image_data(args)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_missing_columns_are_one_line_errors_listing_the_columns(data, tmp_path):
    message = one_line_error(make_args(tmp_path, train_data_dir=str(data.folder), caption_column="caption"))
    assert message.startswith("--caption_column caption") and "columns image, text" in message
    message = one_line_error(make_args(tmp_path, train_data_dir=str(data.folder), image_column="picture"))
    assert message.startswith("--image_column picture") and "columns image, text" in message
    message = one_line_error(make_args(tmp_path, train_data_dir=str(data.tars), image_column="jpg"))
    assert message.startswith("--image_column jpg") and "png, txt, json" in message and "caption, key" in message
    message = one_line_error(make_args(tmp_path, train_data_dir=str(data.tars), caption_column="prompt"))
    assert message.startswith("--caption_column prompt") and "shard-000.tar" in message
    assert "--max_train_steps" in one_line_error(make_args(tmp_path, train_data_dir=str(data.tars), max_train_steps=None))
    assert "--max_train_steps" in one_line_error(make_args(tmp_path, train_data_dir=str(data.folder), streaming=True,
                                                           max_train_steps=None))
    assert "one of them" in one_line_error(make_args(tmp_path, train_data_dir=str(data.folder), dataset_name="x/y"))
    assert one_line_error(make_args(tmp_path, train_data_dir=str(tmp_path / "nope"))).startswith("--train_data_dir")
    message = one_line_error(make_args(tmp_path, dataset_name="nobody/no-such-dataset"))
    assert message.startswith("--dataset_name nobody/no-such-dataset: cannot load")
    with pytest.raises(ImageDataError, match="fewer than one global batch"):
        open_image_source(make_args(tmp_path, train_data_dir=str(data.folder), train_batch_size=7), 0, 2)
    # A map-style folder needs no --max_train_steps; column defaults per route.
    assert check_image_data(make_args(tmp_path, train_data_dir=str(data.folder), max_train_steps=None)).route == "dataset"
    assert resolve_caption_column(make_args(tmp_path, train_data_dir=str(data.tars))) == "txt"
    assert resolve_caption_column(make_args(tmp_path, train_data_dir=str(data.folder))) == "text"
    assert resolve_caption_column(make_args(tmp_path)) == "prompt"


# ---- latents ----------------------------------------------------------------------------------------

def test_latents_depend_on_seed_epoch_id_not_on_the_batch(vae):
    pixels = torch.rand(4, 3, RES, RES) * 2 - 1
    ids = [10, 11, 12, 13]
    together = encode_images(vae, pixels, latent_generators(3, 1, ids))
    assert together.shape == (4, 4, RES // 8, RES // 8) and together.dtype == torch.float32
    alone = torch.cat([encode_images(vae, pixels[i : i + 1], latent_generators(3, 1, [ids[i]])) for i in range(4)])
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    order = [2, 0, 3, 1]
    shuffled = encode_images(vae, pixels[order], latent_generators(3, 1, [ids[i] for i in order]))
    torch.testing.assert_close(shuffled, together[order], rtol=0, atol=1e-5)
    # What diffusers computes with a generator per sample, times the scaling factor.
    with torch.no_grad():
        reference = vae.encode(pixels).latent_dist.sample(generator=latent_generators(3, 1, ids)) * vae.config.scaling_factor
    torch.testing.assert_close(together, reference, rtol=0, atol=1e-6)
    # Another epoch draws other noise; the posterior mean is the same.
    other = encode_images(vae, pixels, latent_generators(3, 2, ids))
    assert (other - together).abs().mean() > 1e-3


def test_prefetch_keeps_order_and_raises_the_producer_error():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ImageDataError("bad shard")

    items = prefetch(failing())
    assert next(items) == 1
    with pytest.raises(ImageDataError, match="bad shard"):
        next(items)


def live_threads(prefix):
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_closing_the_prefetch_joins_its_thread_and_closes_the_source():
    """A consumer that stops early (the training's last step) closes the prefetch: the producer thread is joined
    at once, even while it is inside a slow item, and the source generator is closed (its cleanup runs). A
    daemon thread left decoding at interpreter exit aborts the process after the outputs are written."""
    import time

    closed = []

    def slow_source():
        try:
            i = 0
            while True:
                time.sleep(0.3)  # decoding a batch
                yield i
                i += 1
        finally:
            closed.append(True)

    items = prefetch(slow_source(), depth=2)
    assert [next(items), next(items)] == [0, 1]
    assert live_threads("image-prefetch"), "the producer runs ahead"
    items.close()
    assert live_threads("image-prefetch") == [] and closed == [True]


def test_closing_the_prefetch_while_the_producer_fails_or_ends_does_not_hang():
    """The producer's last message (an error, or the end) waits for room in a full queue: a consumer that closes
    instead of reading on must not leave it (and the join) waiting forever."""
    import threading
    import time

    def failing_after(n):
        yield from range(n)
        raise ImageDataError("bad shard")

    for source in (failing_after(2), iter(range(2))):
        items = prefetch(source, depth=1)
        assert next(items) == 0
        time.sleep(0.5)  # the producer has queued 1 and now waits to hand over its error, or the end
        closer = threading.Thread(target=items.close)
        closer.start()
        closer.join(timeout=10)
        assert not closer.is_alive() and live_threads("image-prefetch") == []


def test_closing_the_batches_stops_the_decode_threads(data, tmp_path):
    source = open_image_source(make_args(tmp_path, train_data_dir=str(data.bad_folder), dataloader_num_workers=3), 0, 1)
    batches = source.batches()
    next(batches)
    assert len(live_threads("image-decode")) >= 1
    batches.close()
    assert live_threads("image-decode") == []


def test_decode_threads_give_the_same_batches(data, tmp_path):
    plain = take(open_image_source(make_args(tmp_path, train_data_dir=str(data.bad_folder)), 0, 1), 6)
    threaded = take(open_image_source(make_args(tmp_path, train_data_dir=str(data.bad_folder), dataloader_num_workers=3), 0, 1), 6)
    for a, b in zip(plain, threaded):
        assert a.ids == b.ids and torch.equal(a.pixel_values, b.pixel_values)


# ---- --max_train_samples: diffusers' shuffle(seed).select(range(N)) on every route --------------------------

def test_max_train_samples_is_a_seeded_random_subset_like_diffusers(data, tmp_path):
    import datasets

    from yoso.data.prompts import read_prompts, shuffled_subset

    def selected(n, k, seed):  # what diffusers' examples do with --max_train_samples
        return datasets.Dataset.from_dict({"row": list(range(n))}).shuffle(seed=seed).select(range(k))["row"]

    for n, k, seed in ((13, 5, 3), (13, 5, 0), (100, 7, 42)):
        assert shuffled_subset(n, k, seed) == selected(n, k, seed)
    subset = shuffled_subset(NUM_SAMPLES, 5, 3)
    assert sorted(subset) != list(range(5)) and shuffled_subset(NUM_SAMPLES, 5, 4) != subset

    # A prompt file (.jsonl and plain text alike).
    prompts = [f"prompt {i}" for i in range(NUM_SAMPLES)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    for name in ("p.jsonl", "p.txt"):
        assert read_prompts(tmp_path / name, max_samples=5, seed=3) == [prompts[i] for i in subset]
        assert read_prompts(tmp_path / name, max_samples=50, seed=3) == prompts  # more than there are: all, in order

    # A map-style dataset (an image folder): each epoch holds exactly the subset's samples.
    def captions_per_epoch(args, epochs=2):
        batches = take(open_image_source(args, 0, 1), 5 * epochs)  # batch 1: 5 batches an epoch
        return [sorted(c for b in batches if b.epoch == e for c in b.captions) for e in range(epochs)]

    expected = sorted(f"caption number {i}" for i in subset)
    assert captions_per_epoch(ROUTES["folder"](data, tmp_path, train_batch_size=1, max_train_samples=5)) == [expected] * 2

    # Streams (tar shards here) cannot be permuted whole: the subset is IterableDataset.shuffle(seed).take(n)'s
    # (seeded shard order and buffer), the same every epoch, and another seed picks another subset.
    subsets = set()
    for seed in range(4):
        per_epoch = captions_per_epoch(ROUTES["tar"](data, tmp_path, train_batch_size=1, max_train_samples=5, seed=seed))
        assert per_epoch[0] == per_epoch[1] and len(set(per_epoch[0])) == 5, seed
        subsets.add(tuple(per_epoch[0]))
    first_five = tuple(sorted(f"caption number {i}" for i in range(5)))
    assert len(subsets) >= 3 and subsets != {first_five}


EXIT_CHILD = r"""
import io, json, sys
from pathlib import Path
from types import SimpleNamespace
import numpy as np
from PIL import Image
from yoso.data.image_data import open_image_source, prefetch

folder = Path(sys.argv[1])
folder.mkdir()
rng = np.random.default_rng(0)
with open(folder / "metadata.jsonl", "w") as meta:
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg", quality=95)
        meta.write(json.dumps({"file_name": f"{i:03d}.jpg", "text": f"caption {i}"}) + "\n")
args = SimpleNamespace(dataset_name=None, dataset_config_name=None, train_data_dir=str(folder), image_column="image",
                       caption_column=None, resolution=256, train_batch_size=4, seed=0, center_crop=False,
                       random_flip=True, max_train_steps=100, max_train_samples=None, streaming=False,
                       shuffle_buffer_size=5, cache_dir=str(folder.parent / "cache"), dataloader_num_workers=2)
AHEAD = prefetch(open_image_source(args, 0, 1).batches(0), depth=2)  # a global: never closed by the program
next(AHEAD)
print("took a batch", flush=True)
if sys.argv[2] == "raise":
    raise SystemExit("the run failed after its first step")
"""


@pytest.mark.parametrize("how", ["return", "raise"])
def test_exit_with_the_prefetch_and_decode_threads_running_is_clean(tmp_path, how):
    """A program that ends (or fails) while the prefetch thread and the decode threads are still reading ahead,
    without closing them, exits with its own status and no abort: the threads are stopped and joined before the
    interpreter finalizes (a daemon thread still decoding at exit once aborted a run, "terminate called without
    an active exception"; closing the generator in its ``finally`` alone came too late when the program raised).
    """
    script = tmp_path / "child.py"
    script.write_text(EXIT_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for attempt in range(3):  # the abort is timing-dependent: exit at several points of the read-ahead
        result = subprocess.run([sys.executable, str(script), str(tmp_path / f"data{attempt}"), how],
                                capture_output=True, text=True, timeout=300, env=env)
        assert "took a batch" in result.stdout, result.stderr
        assert result.returncode == (0 if how == "return" else 1), result.stderr
        assert "terminate called" not in result.stderr and "Fatal Python error" not in result.stderr, result.stderr


def test_data_machinery_benchmark_runs_and_the_docs_quote_its_committed_figures(tmp_path):
    """benchmarks/bench_data_machinery.py on 8 images: every route (own threads, prefetch, a DataLoader port)
    gives the sequential route's pixels; the figures docs/development.md quotes are the committed results'."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_data_machinery.py"), "--images", "8",
                             "--step_s", "0", "--resume_at", "4"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert len(report["images"]) == 8 and all(r["same_pixels_as_sequential"] for r in report["images"].values())
    assert report["truncated shard"]["own TarShards: samples read up to the cut"] > 0

    committed = json.loads((repo / "benchmarks" / "results" / "data_machinery.json").read_text())
    docs = (repo / "docs" / "development.md").read_text()
    images, tars = committed["images"], committed["tars"]
    quoted = [images["own, 2 threads + prefetch thread, 0.15s step"]["images_per_s"],
              images["DataLoader, 2 worker processes, 0.15s step"]["images_per_s"],
              tars["datasets webdataset (streaming, decode=False)"]["samples_per_s"],
              tars["own TarShards"]["samples_per_s"], committed["truncated shard"]["own TarShards: samples read up to the cut"]]
    for figure in quoted:
        assert f"{figure:,}" in docs, figure
