"""train_yoso_lora.py on images with captions instead of the teacher (issue 14.4): an imagefolder with a
metadata.jsonl under accelerate launch, 1 and 2 processes, exact resume; and tar shards (streamed)."""

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from harness import launch, tiny_train_args

NUM_IMAGES = 24
CAPTIONS = ["a red square", "a blue circle", "a green line", "a yellow dot"]


def write_image(path, i):
    rng = np.random.default_rng(i)
    pixels = (rng.random((80, 72, 3)) * 255).astype(np.uint8)  # not square: resize and crop do work
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    with open(folder / "metadata.jsonl", "w") as handle:
        for i in range(NUM_IMAGES):
            write_image(folder / f"{i:03d}.png", i)
            handle.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"{CAPTIONS[i % 4]}, number {i}"}) + "\n")
    return folder


def image_args(tiny_base, folder, out, steps, **extra):
    # --pretrained_teacher_model points nowhere: with images the teacher is neither checked nor loaded.
    args = tiny_train_args(tiny_base, "./no/teacher/needed", "unused.jsonl", out, steps=steps, report_to="none", **extra)
    i = args.index("--train_data")
    return args[:i] + args[i + 2:] + ["--train_data_dir", str(folder), "--random_flip"]


@pytest.fixture(scope="module")
def image_run(tiny_base, image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("image_run")
    result = launch(image_args(tiny_base, image_folder, root / "out", steps=4, use_ema=True, checkpointing_steps=2),
                    dump=root / "dump")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_training_on_images_writes_a_lora_and_the_images_latent_statistics(image_run, tiny_base, image_folder):
    from diffusers import AutoencoderKL

    root, result = image_run
    out = root / "out"
    assert "the teacher is not loaded" not in result.stderr and "24 prompts" not in result.stderr
    assert "images (ImageDatasetSource)" in result.stderr
    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors",
                 "checkpoint-4/pytorch_lora_weights.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(out / name).values())
    seen = json.loads((root / "dump" / "rank0_indices.json").read_text())
    assert len(seen) == 4 and all(len(b) == 4 for b in seen) and len({i for b in seen for i in b}) == 16
    # The data's reader thread was joined when the loop ended (a daemon thread left decoding aborted the
    # process at exit, after the outputs were written).
    threads = json.loads((root / "dump" / "rank0_threads.json").read_text())
    assert "MainThread" in threads and not [t for t in threads if t.startswith(("image-prefetch", "image-decode"))]
    # x0 is the base VAE's latent of the data source's images: the statistics equal those of the source's
    # first 4 batches encoded here, in this process, with the same per-sample noise.
    from train_yoso_lora import parse_args
    from yoso.data.image_data import open_image_source
    from yoso.data.image_processing import encode_images, latent_generators
    from yoso.data.latent_stats import LatentStats

    args = parse_args([str(a) for a in image_args(tiny_base, image_folder, out, steps=4)])
    batches = open_image_source(args).batches()
    vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    expected = LatentStats((4, 8, 8))
    for _ in range(4):
        batch = next(batches)
        assert [int(i) for i in batch.ids] == seen.pop(0)
        expected.update(encode_images(vae, batch.pixel_values, latent_generators(0, batch.epoch, batch.ids)))
    stats = load_file(out / "latent_stats.safetensors")
    assert stats["count"].item() == expected.count == 16
    assert (stats["mean"] - expected.mean()).abs().max().item() <= 1e-5
    assert abs(stats["std"].item() - expected.std()) <= 1e-5


def test_image_training_resumes_exactly(image_run, tiny_base, image_folder, tmp_path):
    root, _ = image_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(root / "out" / "checkpoint-2", resumed / "checkpoint-2")
    result = launch(image_args(tiny_base, image_folder, resumed, steps=4, use_ema=True, checkpointing_steps=100,
                               resume_from_checkpoint="latest"), dump=tmp_path / "dump")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors",
                 "latent_stats.safetensors"):
        a, b = load_file(root / "out" / name), load_file(resumed / name)
        assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6, name
    full = json.loads((root / "dump" / "rank0_indices.json").read_text())
    assert json.loads((tmp_path / "dump" / "rank0_indices.json").read_text()) == full[2:]


def test_two_processes_train_on_disjoint_images(tiny_base, image_folder, tmp_path):
    result = launch(image_args(tiny_base, image_folder, tmp_path / "out", steps=2, train_batch_size=2,
                               checkpointing_steps=100), num_processes=2, dump=tmp_path / "dump")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / "dump" / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    seen = [{i for b in json.loads((tmp_path / "dump" / f"rank{r}_indices.json").read_text()) for i in b} for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
    assert load_file(tmp_path / "out" / "latent_stats.safetensors")["count"].item() == 2 * 2 * 2


def test_tar_shards_stream_and_a_corrupt_image_is_skipped(tiny_base, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for j in range(6):
                i = 6 * s + j
                key = f"{i:06d}"
                write_image(tmp_path / "x.png", i)
                if i == 3:
                    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
                tar.add(tmp_path / "x.png", arcname=f"{key}.png")
                (tmp_path / "x.txt").write_text(f"{CAPTIONS[i % 4]}, number {i}")
                tar.add(tmp_path / "x.txt", arcname=f"{key}.txt")
    result = launch(image_args(tiny_base, shards, tmp_path / "out", steps=3, checkpointing_steps=100))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "StreamedImageSource" in result.stderr
    assert "unreadable images skipped (replaced by the next readable one): 1" in result.stderr, result.stderr[-6000:]
    assert load_file(tmp_path / "out" / "latent_stats.safetensors")["count"].item() == 12
