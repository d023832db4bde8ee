"""Library vs own code for the data machinery, measured (docs/development.md, "Libraries vs own code").

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_data_machinery.py [--images 64] [--workers 2]

Four measurements, each on data made here (JPEGs of a JourneyDB-like size, tar shards, CLIP prompts):

1. image batches, map-style route: our source sequential, with its decode threads, with its decode threads
   behind the prefetch thread, and torch's DataLoader with worker processes over the same batches (a
   batch-index sampler starting at the resume offset, so resume stays exact): seconds to the first batch,
   images per second, private memory (USS) of the worker processes;
2. tar shards: our header-only reader vs datasets' webdataset loader (streaming): samples per second, and
   the seconds to resume after k samples (ours seeks over headers; datasets' reads every member);
3. datasets' webdataset loader on a truncated shard (what a partly downloaded shard does to a run);
4. prompts: CLIP-tokenizing one batch, the cost the prompt-side thread pool hides.
"""

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import torch
from PIL import Image

from yoso.data.image_data import open_image_source, prefetch


def write_data(root, n, size=(640, 512)):
    rng = np.random.default_rng(0)
    folder, tars = root / "folder", root / "tars"
    folder.mkdir()
    tars.mkdir()
    base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    with open(folder / "metadata.jsonl", "w") as meta, tarfile.open(tars / "shard-000.tar", "w") as tar:
        for i in range(n):
            image = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            data, caption = buffer.getvalue(), f"a photo number {i} of a cat on a red sofa, studio light"
            (folder / f"{i:05d}.jpg").write_bytes(data)
            meta.write(json.dumps({"file_name": f"{i:05d}.jpg", "text": caption}) + "\n")
            for name, payload in ((f"{i:05d}.jpg", data), (f"{i:05d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder, tars


def args_for(root, **overrides):
    args = dict(dataset_name=None, dataset_config_name=None, train_data_dir=None, image_column="image",
                caption_column=None, resolution=256, train_batch_size=4, seed=0, center_crop=False, random_flip=True,
                max_train_steps=100, max_train_samples=None, streaming=False, shuffle_buffer_size=64,
                cache_dir=str(root / "cache"), dataloader_num_workers=0)
    args.update(overrides)
    return SimpleNamespace(**args)


class BatchDataset(torch.utils.data.Dataset):
    """The source's batch ``b`` (epoch 0) as a map-style item: what a DataLoader port would hand its workers."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return self.source.batches_per_epoch

    def __getitem__(self, b):
        batches = self.source.batches(start_batch=b)
        try:
            return next(batches)
        finally:
            batches.close()


def children_peak_rss():
    """Private memory (USS) of the worker processes: what each fork of the training process costs on its own."""
    return sum(c.memory_full_info().uss for c in psutil.Process().children(recursive=True))


def time_batches(make_iterator, n_batches, batch_size, poll_children=False):
    start = time.perf_counter()
    iterator = make_iterator()
    first, peak, outs = None, 0, []
    for _ in range(n_batches):
        outs.append(next(iterator))
        first = first if first is not None else time.perf_counter() - start
        if poll_children:
            peak = max(peak, children_peak_rss())
    total = time.perf_counter() - start
    if hasattr(iterator, "close"):
        iterator.close()
    del iterator
    return dict(first_s=round(first, 3), images_per_s=round(n_batches * batch_size / total, 1),
                workers_uss_mb=round(peak / 2**20, 1)), outs


def bench_images(folder, root, n_images, workers, step_s):
    args = args_for(root, train_data_dir=str(folder))
    n_batches = n_images // args.train_batch_size
    results = {}

    def own(num_workers, ahead):
        def make():
            source = open_image_source(args_for(root, train_data_dir=str(folder), dataloader_num_workers=num_workers), 0, 1)
            batches = source.batches(0)
            return prefetch(batches) if ahead else batches
        return make

    def with_step(make):  # a training step of step_s seconds between batches (what prefetching overlaps)
        def wrapped():
            for batch in make():
                yield batch
                time.sleep(step_s)
        return wrapped

    def loader(num_workers):
        def make():
            source = open_image_source(args, 0, 1)
            return iter(torch.utils.data.DataLoader(BatchDataset(source), batch_size=None, num_workers=num_workers,
                                                    sampler=range(0, source.batches_per_epoch), prefetch_factor=2))
        return make

    time_batches(own(0, False), 2, args.train_batch_size)  # warm-up: imports, the folder's datasets cache
    reference = None
    for name, make in ((f"own, sequential", own(0, False)), (f"own, {workers} decode threads", own(workers, False)),
                       (f"own, {workers} threads + prefetch thread", own(workers, True)),
                       (f"DataLoader, {workers} worker processes", loader(workers))):
        for label, maker in ((name, make), (f"{name}, {step_s}s step", with_step(make))):
            result, outs = time_batches(maker, n_batches, args.train_batch_size, poll_children="DataLoader" in name)
            pixels = torch.cat([b.pixel_values for b in outs])
            reference = pixels if reference is None else reference
            result["same_pixels_as_sequential"] = bool(torch.equal(pixels, reference))
            results[label] = result
    return results


def bench_tars(tars, n_images, resume_at):
    from datasets import load_dataset

    from yoso.data.tar_shards import TarShards, find_tar_shards

    results = {}
    resume_at = min(resume_at, n_images - 1)
    shards = TarShards(find_tar_shards(tars), "jpg", "txt")
    start = time.perf_counter()
    records = list(shards.records(0))
    scan = time.perf_counter() - start
    start = time.perf_counter()
    for record in records:
        shards.read(record)
    read = time.perf_counter() - start
    start = time.perf_counter()
    shards = TarShards(find_tar_shards(tars), "jpg", "txt")  # a resumed run: scan headers, read sample k
    shards.read(next(r for i, r in enumerate(shards.records(0)) if i == resume_at))
    results["own TarShards"] = dict(scan_headers_s=round(scan, 4), samples_per_s=round(n_images / (scan + read)),
                                    resume_after_k_s=round(time.perf_counter() - start, 4))

    files = [str(p) for p in find_tar_shards(tars)]
    start = time.perf_counter()
    stream = load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    count = sum(1 for _ in stream)
    total = time.perf_counter() - start
    start = time.perf_counter()
    next(iter(stream.skip(resume_at)))
    results["datasets webdataset (streaming)"] = dict(samples_per_s=round(count / total),
                                                      resume_after_k_s=round(time.perf_counter() - start, 4),
                                                      note="decodes every image to PIL while iterating")
    stream_raw = load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True).decode(False)
    start = time.perf_counter()
    count = sum(1 for _ in stream_raw)
    results["datasets webdataset (streaming, decode=False)"] = dict(samples_per_s=round(count / (time.perf_counter() - start)))
    return results


def bench_truncated(tars, root):
    from datasets import load_dataset

    from yoso.data.tar_shards import TarShards

    cut = root / "cut"
    cut.mkdir()
    data = (tars / "shard-000.tar").read_bytes()
    (cut / "shard-000.tar").write_bytes(data[: len(data) // 2 + 777])
    shards = TarShards([cut / "shard-000.tar"], "jpg", "txt")
    own = sum(1 for _ in shards.records(0))
    try:
        stream = load_dataset("webdataset", data_files={"train": [str(cut / "shard-000.tar")]}, split="train",
                              streaming=True).decode(False)
        theirs = f"{sum(1 for _ in stream)} samples"
    except Exception as error:  # noqa: BLE001 - the point is what it raises
        theirs = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return {"own TarShards: samples read up to the cut": own, "datasets webdataset": theirs}


def bench_tokenize(batch_size=16, repeats=200):
    from yoso.data.clip_bpe import make_clip_tokenizer
    from yoso.data.prompts import tokenize_prompts

    tokenizer = make_clip_tokenizer()
    prompts = [f"a highly detailed photograph number {i} of a cat sitting on a red velvet sofa, studio light, 85mm"
               for i in range(batch_size)]
    tokenize_prompts(tokenizer, prompts)
    start = time.perf_counter()
    for _ in range(repeats):
        tokenize_prompts(tokenizer, prompts)
    return {f"CLIP-tokenize a batch of {batch_size} prompts, ms": round((time.perf_counter() - start) / repeats * 1e3, 3)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step_s", type=float, default=0.15, help="a stand-in training step between batches")
    parser.add_argument("--resume_at", type=int, default=48)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, tars = write_data(root, opts.images)
        report = {"cpus": os.cpu_count(), "torch": torch.__version__,
                  "images": bench_images(folder, root, opts.images, opts.workers, opts.step_s),
                  "tars": bench_tars(tars, opts.images, opts.resume_at),
                  "truncated shard": bench_truncated(tars, root),
                  "prompts": bench_tokenize()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
