"""Teacher-latent cache (issue 7): exact latents by index, the same step and the same training run as
on-the-fly generation, sharding across ranks, exact resume, and one-line refusals of a foreign cache."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from harness import PROMPTS, build_trainer, launch, make_batch, tiny_train_args, write_prompts

# Cached and on-the-fly latents come from teacher calls on different batches (precompute batches consecutive
# prompts, training batches the sampler's), so fp32 kernels may round differently: equal to ~1e-6 relative.
TOL = 1e-6


def rel(a, b):
    """max |a - b| relative to the size of b (absolute where |b| < 1)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1.0)).item()


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(rel(a[k], b[k]) for k in a)


def tiny_latent_source(teacher_path):
    from yoso.data.teacher import TeacherLatents, load_teacher

    return TeacherLatents(load_teacher(teacher_path, torch.float32, "cpu"), 1, 0.0)


def make_cache(folder, teacher_path, prompts, seed=0, num_epochs=1, shard_size=6, batch_size=3, rank=0, world_size=1,
               latent_source=None, resolution=64):
    from yoso.data.latent_cache import make_cache_settings, precompute_latents

    settings = make_cache_settings(teacher_path, resolution, (4, resolution // 8, resolution // 8), 1, 0.0, seed, prompts)
    latent_source = latent_source or tiny_latent_source(teacher_path)
    precompute_latents(folder, latent_source, prompts, settings, num_epochs, shard_size, batch_size, rank, world_size)
    return settings


# ---- the cache itself ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_teacher):
    """13 prompts x 2 epochs in shards of 6 (the last one partial), teacher batches of 3."""
    from yoso.data.latent_cache import write_cache_info

    folder = tmp_path_factory.mktemp("small_cache")
    prompts = [f"{PROMPTS[i % 4]}, take {i}" for i in range(13)]
    settings = make_cache(folder, tiny_teacher, prompts, seed=3, num_epochs=2)
    write_cache_info(folder, settings, 2, 6, 3, torch.float32, torch.float32)
    return folder, prompts


def test_cached_latents_are_the_teachers_for_each_epoch_and_index(small_cache, tiny_teacher):
    from yoso.data.prompts import ShardedPromptSampler
    from yoso.data.latent_cache import LatentCacheReader
    from yoso.data.teacher import teacher_noise, teacher_noise_seeds

    folder, prompts = small_cache
    info = json.loads((folder / "cache_info.json").read_text())
    assert info["num_epochs"] == 2 and info["shards_per_epoch"] == 3 and info["latent_shape"] == [4, 8, 8]
    assert info["teacher"] == os.path.realpath(tiny_teacher) and info["seed"] == 3
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        f"latents-e{e:04d}-s{s:06d}.safetensors" for e in range(2) for s in range(3)]
    reader = LatentCacheReader(folder, max_open_shards=2)
    source = tiny_latent_source(tiny_teacher)
    for epoch, indices in ((0, [12, 0, 5, 4]), (1, [7, 2, 10])):  # any indices, across shards
        seeds = teacher_noise_seeds(3, epoch, indices)
        expected = source([prompts[i] for i in indices], teacher_noise(seeds, (4, 8, 8), "cpu", torch.float32))
        cached = reader.latents(epoch, indices)
        assert cached.dtype == torch.float32 and cached.shape == (len(indices), 4, 8, 8)
        assert rel(cached, expected) <= TOL
        assert reader.noise_seeds(epoch, indices) == seeds
        assert reader.prompts(epoch, indices) == [prompts[i] for i in indices]
        assert len(reader._open) <= 2  # bounded number of open shards
    # The training sampler's batches (batch 3, any number of processes) are exactly the teacher's batches:
    # bit-identical latents.
    for world_size, rank in ((1, 0), (2, 0), (2, 1), (4, 3)):
        sampler = ShardedPromptSampler(13, 3, world_size, rank, seed=3)
        for epoch, _, indices in _take(sampler.batches(), 5):  # crosses into epoch 1
            if epoch >= 2:  # not cached (epoch 2 reads epoch 0, checked below)
                continue
            seeds = teacher_noise_seeds(3, epoch, indices)
            expected = source([prompts[i] for i in indices], teacher_noise(seeds, (4, 8, 8), "cpu", torch.float32))
            assert torch.equal(reader.latents(epoch, indices), expected), (world_size, rank, epoch, indices)
    assert not torch.equal(reader.latents(0, [1]), reader.latents(1, [1]))  # fresh noise each epoch
    # Past the cached epochs: epoch e reads epoch e mod 2.
    assert torch.equal(reader.latents(2, [4, 9]), reader.latents(0, [4, 9]))
    assert torch.equal(reader.latents(5, [4, 9]), reader.latents(1, [4, 9]))
    with pytest.raises(IndexError):
        reader.latents(0, [13])


def _take(iterator, n):
    return [item for _, item in zip(range(n), iterator)]


def test_ranks_split_the_shards_and_write_the_same_files(small_cache, tiny_teacher, tmp_path):
    folder, prompts = small_cache
    source = tiny_latent_source(tiny_teacher)
    for rank in (1, 0):  # two "processes" in turn: each writes its round-robin share
        make_cache(tmp_path, tiny_teacher, prompts, seed=3, num_epochs=2, rank=rank, world_size=2, latent_source=source)
        if rank == 1:
            assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [  # round robin over (epoch, shard)
                "latents-e0000-s000001.safetensors", "latents-e0001-s000000.safetensors", "latents-e0001-s000002.safetensors"]
    for path in folder.glob("*.safetensors"):
        a, b = load_file(path), load_file(tmp_path / path.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path.name
    # Rerunning skips finished shards (resuming an interrupted precompute).
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.safetensors")}
    make_cache(tmp_path, tiny_teacher, prompts, seed=3, num_epochs=2, latent_source=source)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.safetensors")} == before


def test_refusals_name_what_differs(small_cache, tiny_teacher, tiny_base):
    from yoso.data.latent_cache import LatentCacheError, check_cache, make_cache_settings

    folder, prompts = small_cache

    def check(teacher=tiny_teacher, resolution=64, steps=1, guidance=0.0, seed=3, run_prompts=prompts):
        side = resolution // 8
        return check_cache(folder, make_cache_settings(teacher, resolution, (4, side, side), steps, guidance, seed,
                                                       run_prompts))

    assert check()["num_prompts"] == 13
    cases = {
        "teacher": (dict(teacher=tiny_base), f"was made with teacher {os.path.realpath(tiny_teacher)} at resolution 64, "
                                             f"this run asks for {os.path.realpath(tiny_base)} at 64"),
        "resolution": (dict(resolution=128), "at resolution 64, this run asks for"),
        "seed": (dict(seed=4), "was made with --seed 3, this run asks for --seed 4"),
        "steps": (dict(steps=2, guidance=1.5), "--teacher_num_inference_steps 1 and --teacher_guidance_scale 0.0, "
                                               "this run asks for --teacher_num_inference_steps 2 and"),
        "prompts": (dict(run_prompts=prompts[:12]), "was made from 13 other prompts, this run reads 12"),
    }
    for name, (kwargs, expected) in cases.items():
        with pytest.raises(LatentCacheError) as error:
            check(**kwargs)
        message = str(error.value)
        assert "\n" not in message and expected in message and message.endswith(
            "rebuild it with precompute_teacher_latents.py"), (name, message)
    with pytest.raises(LatentCacheError, match="no cache_info.json"):
        check_cache(folder.parent, make_cache_settings(tiny_teacher, 64, (4, 8, 8), 1, 0.0, 3, prompts))


# ---- the training step ----------------------------------------------------------------------------------

def test_step_from_cache_equals_step_with_teacher(tiny_base, tiny_teacher, tmp_path):
    """One YOSOTrainingStep.step from cached latents: same losses, same LoRA and D after the step."""
    from yoso.method.step import step_generator
    from yoso.data.latent_cache import LatentCacheReader, write_cache_info
    from yoso.method.lora import lora_named_parameters

    from yoso.data.prompts import ShardedPromptSampler

    prompts = [f"{PROMPTS[i % 4]}, take {i}" for i in range(8)]
    settings = make_cache(tmp_path, tiny_teacher, prompts, seed=0, shard_size=6, batch_size=3)
    write_cache_info(tmp_path, settings, 1, 6, 3, torch.float32, torch.float32)
    reader = LatentCacheReader(tmp_path)
    _, _, indices = _take(ShardedPromptSampler(8, 3, 1, 0, seed=0).batches(), 2)[1]  # the second batch
    batch_prompts = [prompts[i] for i in indices]

    results = []
    for cached in (False, True):
        trainer, models = build_trainer(tiny_base, None if cached else tiny_teacher, use_ema=True, seed=0)
        assert (models.latent_source is None) == cached
        batch = make_batch(models, batch_prompts, epoch=0) | {"indices": indices}
        if cached:
            batch["latents"] = reader.latents(0, indices)
        with trainer.accelerator.accumulate(trainer.unet, trainer.discriminator):
            logs = trainer.step(batch, step_generator(0, 0, 0))
        weights = {f"lora.{n}": p.detach().clone() for n, p in lora_named_parameters(trainer.unet_module)}
        weights |= {f"d.{n}": p.detach().clone() for n, p in trainer.discriminator_module.state_dict().items()}
        weights |= {f"ema.{i}": s.clone() for i, s in enumerate(trainer.ema.shadow)}
        results.append(({k: v for k, v in logs.items() if torch.is_tensor(v)}, weights))
    (logs_t, weights_t), (logs_c, weights_c) = results
    assert max_diff(logs_t, logs_c) <= TOL
    assert max_diff(weights_t, weights_c) <= TOL
    assert torch.isfinite(logs_t["loss_g"] if "loss_g" in logs_t else logs_t["loss_kl"]) and logs_t["loss_kl"].item() > 0


# ---- train_yoso_lora.py end to end ------------------------------------------------------------------------

STEPS = 8  # 24 prompts / batch 4 = 6 batches an epoch: the runs cross into epoch 1


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("cache_data") / "prompts.jsonl", n=24)


def precompute_args(base, teacher, prompts_file, output_dir, **extra):
    args = ["--pretrained_model_name_or_path", base, "--pretrained_teacher_model", teacher, "--train_data", prompts_file,
            "--resolution", "64",
            "--seed", "0", "--output_dir", output_dir, "--num_train_epochs", "2", "--shard_size", "10", "--train_batch_size", "4"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


@pytest.fixture(scope="module")
def cache_dir(tiny_base, tiny_teacher, prompts_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_cache") / "cache"
    result = launch(precompute_args(tiny_base, tiny_teacher, prompts_file, folder), script="precompute_teacher_latents.py")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def on_the_fly_run(tiny_base, tiny_teacher, prompts_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("on_the_fly")
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, root / "out", steps=STEPS, use_ema=True,
                                    ema_decay=0.5, checkpointing_steps=100, report_to="none"),
                    dump=root / "dump")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_cache_cli_writes_info_and_shards(cache_dir, tiny_teacher, prompts_file):
    from yoso.data.prompts import read_prompts
    from yoso.data.latent_cache import LatentCacheReader, prompts_digest

    info = json.loads((cache_dir / "cache_info.json").read_text())
    prompts = read_prompts(prompts_file)
    assert info["num_prompts"] == 24 and info["prompts_sha256"] == prompts_digest(prompts)
    assert info["num_epochs"] == 2 and info["shard_size"] == 8 and info["shards_per_epoch"] == 3  # 10 -> 8 (batch 4)
    assert info["batch_size"] == 4
    assert info["dtype"] == "float32" and info["noise_dtype"] == "float32" and info["mixed_precision"] == "no"
    assert info["teacher_num_inference_steps"] == 1 and info["teacher_guidance_scale"] == 0.0
    # SD-Turbo-shaped teacher, equal VAE configs: the teacher's own latents, no VAE in the route.
    assert info["latent_transcode"] is False and info["teacher_vae"] is None and info["base_vae"] is None
    assert len(list(cache_dir.glob("latents-*.safetensors"))) == 6
    assert LatentCacheReader(cache_dir).prompts(1, [23, 0]) == [prompts[23], prompts[0]]


def test_training_from_cache_equals_on_the_fly_and_resumes_exactly(cache_dir, on_the_fly_run, tiny_base, tiny_teacher,
                                                                    prompts_file, tmp_path):
    common = dict(steps=STEPS, use_ema=True, ema_decay=0.5, report_to="none", teacher_latent_cache=cache_dir)
    out = tmp_path / "cached"
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, out, checkpointing_steps=5, **common),
                    dump=tmp_path / "dump")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the teacher is not loaded" in result.stderr
    reference = on_the_fly_run
    # The LoRA (EMA and raw), D and the latent statistics equal those of on-the-fly training.
    assert max_diff(load_file(out / "pytorch_lora_weights.safetensors"),
                    load_file(reference / "out" / "pytorch_lora_weights.safetensors")) <= TOL
    assert max_diff(load_file(tmp_path / "dump" / "rank0.safetensors"),
                    load_file(reference / "dump" / "rank0.safetensors")) <= TOL
    assert max_diff(load_file(out / "latent_stats.safetensors"),
                    load_file(reference / "out" / "latent_stats.safetensors")) <= TOL

    # Resuming from the cache run's checkpoint-5 gives the uninterrupted result.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-5", resumed / "checkpoint-5")
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, resumed, checkpointing_steps=100,
                                    resume_from_checkpoint="latest", **common),
                    dump=tmp_path / "dump_resumed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors",
                 "latent_stats.safetensors"):
        assert max_diff(load_file(out / name), load_file(resumed / name)) <= TOL, name
    assert max_diff(load_file(tmp_path / "dump" / "rank0.safetensors"),
                    load_file(tmp_path / "dump_resumed" / "rank0.safetensors")) <= TOL


def test_two_processes_read_their_own_latents(cache_dir, tiny_base, tiny_teacher, prompts_file, tmp_path):
    """2 ranks: precompute split across them writes the same cache; training from it equals on-the-fly."""
    split = tmp_path / "split_cache"
    result = launch(precompute_args(tiny_base, tiny_teacher, prompts_file, split), num_processes=2,
                    script="precompute_teacher_latents.py")
    assert result.returncode == 0, result.stderr[-3000:]
    for path in cache_dir.glob("latents-*.safetensors"):
        a, b = load_file(path), load_file(split / path.name)
        assert all(torch.equal(a[k], b[k]) for k in a), path.name
    assert json.loads((split / "cache_info.json").read_text()) == json.loads((cache_dir / "cache_info.json").read_text())

    dumps = {}
    for mode in ("fly", "cache"):
        extra = {"teacher_latent_cache": split} if mode == "cache" else {}
        result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, tmp_path / mode, steps=4,
                                        checkpointing_steps=100, report_to="none", **extra),
                        num_processes=2, dump=tmp_path / f"dump_{mode}")
        assert result.returncode == 0, result.stderr[-3000:]
        dumps[mode] = [load_file(tmp_path / f"dump_{mode}" / f"rank{r}.safetensors") for r in (0, 1)]
    for rank in (0, 1):
        assert max_diff(dumps["cache"][rank], dumps["fly"][rank]) <= TOL
    assert max_diff(load_file(tmp_path / "cache" / "latent_stats.safetensors"),
                    load_file(tmp_path / "fly" / "latent_stats.safetensors")) <= TOL


def run_main(args):
    """train_yoso_lora.main in this process: the checks run before any accelerator or model exists. Returns
    its one error line (bad input: exit status 2)."""
    import contextlib
    import io

    import train_yoso_lora

    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(stderr):
        train_yoso_lora.main([str(a) for a in args])
    assert exit_info.value.code == 2 and len(stderr.getvalue().strip().splitlines()) == 1, stderr.getvalue()
    return stderr.getvalue().strip()


def test_train_script_refuses_a_foreign_cache_in_one_line(cache_dir, tiny_base, tiny_teacher, prompts_file, tmp_path):
    teacher = os.path.realpath(tiny_teacher)
    base = os.path.realpath(tiny_base)
    message = run_main(tiny_train_args(tiny_base, tiny_base, prompts_file, tmp_path / "a", resolution=128,
                                       teacher_latent_cache=cache_dir))
    assert message == (f"train_yoso_lora.py: error: --teacher_latent_cache {cache_dir} was made with teacher {teacher} "
                       f"at resolution 64, this run asks for {base} at 128: rebuild it with precompute_teacher_latents.py")
    message = run_main(tiny_train_args(tiny_base, tiny_teacher, prompts_file, tmp_path / "b", seed=1,
                                       teacher_latent_cache=cache_dir))
    assert "\n" not in message and "was made with --seed 0, this run asks for --seed 1" in message
    message = run_main(tiny_train_args(tiny_base, tiny_teacher, prompts_file, tmp_path / "c",
                                       teacher_latent_cache=tmp_path / "nowhere"))
    assert "\n" not in message and "no such folder" in message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- a teacher in another latent space (SDXL-Turbo-shaped): the cache holds base-space latents ----------------

@pytest.fixture(scope="module")
def sdxl_cache(tiny_base, tmp_path_factory):
    """precompute_teacher_latents.py (in-process) with the tiny SDXL-Turbo teacher: 7 prompts, batches of 3."""
    import precompute_teacher_latents
    from harness import fresh_accelerator
    from yoso.testing import build_tiny_sdxl_turbo

    root = tmp_path_factory.mktemp("sdxl_cache")
    teacher = build_tiny_sdxl_turbo(root / "sdxl_turbo")
    prompts_path = write_prompts(root / "prompts.jsonl", n=7)
    fresh_accelerator()  # accelerate's state is a process singleton; start from a clean one
    precompute_teacher_latents.main([str(a) for a in [
        "--pretrained_model_name_or_path", tiny_base, "--pretrained_teacher_model", teacher, "--train_data", prompts_path,
        "--resolution", 64, "--seed", 5, "--output_dir", root / "cache", "--shard_size", 3, "--train_batch_size", 3]])
    return root / "cache", teacher, prompts_path


def test_sdxl_teacher_cache_holds_transcoded_latents_equal_to_on_the_fly(sdxl_cache, tiny_base):
    from yoso.data.prompts import ShardedPromptSampler, read_prompts
    from yoso.data.latent_cache import LatentCacheReader
    from yoso.data.teacher import load_teacher_latents, teacher_noise, teacher_noise_seeds

    cache, teacher, prompts_path = sdxl_cache
    prompts = read_prompts(prompts_path)
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["latent_transcode"] is True and info["latent_shape"] == [4, 8, 8]
    assert info["teacher_vae"] == f"{os.path.realpath(teacher)}/vae"
    assert info["base_vae"] == f"{os.path.realpath(tiny_base)}/vae"

    reader = LatentCacheReader(cache)
    source = load_teacher_latents(teacher, tiny_base, torch.float32, "cpu", transcode=True)  # what training runs
    sampler = ShardedPromptSampler(7, 3, 1, 0, seed=5)
    batches = _take(sampler.batches(), 2)  # the training run's batches of the cached epoch
    assert [epoch for epoch, _, _ in batches] == [0, 0]
    for epoch, _, indices in batches:
        noise = teacher_noise(teacher_noise_seeds(5, epoch, indices), source.noise_shape(64), "cpu", torch.float32)
        batch_prompts = [prompts[i] for i in indices]
        cached = reader.latents(epoch, indices)
        assert torch.equal(cached, source(batch_prompts, noise)), indices
        # ... and they are not the teacher's raw (SDXL-space) latents.
        raw = source.teacher_space_latents(batch_prompts, noise)
        assert (cached - raw).abs().max() > 0.1 * raw.abs().max()


def test_a_run_on_another_latent_route_is_refused_in_one_line(sdxl_cache, small_cache, tiny_base, tiny_teacher):
    import argparse

    from yoso.data.prompts import read_prompts
    from yoso.data.latent_cache import LatentCacheError, check_cache, check_cache_for_run, make_cache_settings

    cache, teacher, prompts_path = sdxl_cache
    prompts = read_prompts(prompts_path)

    def run(**changes):
        values = dict(pretrained_model_name_or_path=tiny_base, pretrained_teacher_model=teacher, teacher_vae=None,
                      teacher_latent_transcode="auto", resolution=64, teacher_num_inference_steps=1,
                      teacher_guidance_scale=0.0, seed=5, cache_dir=None, revision=None, teacher_latent_cache=cache)
        return check_cache_for_run(argparse.Namespace(**{**values, **changes}), prompts)

    assert run()["latent_transcode"] is True  # the same route: accepted
    made = f"--teacher_latent_cache {cache} holds latents decoded by {os.path.realpath(teacher)}/vae and re-encoded by "
    cases = {
        "raw": (dict(teacher_latent_transcode="never"),
                made + f"{os.path.realpath(tiny_base)}/vae, this run asks for the teacher's own latents (no transcoding)"),
        "teacher VAE": (dict(teacher_vae=tiny_teacher, teacher_latent_transcode="always"),
                        f"this run asks for latents decoded by {os.path.realpath(tiny_teacher)} and re-encoded by"),
        "base": (dict(pretrained_model_name_or_path=tiny_teacher),  # another base (SD-Turbo-shaped, also 4 x 1/8)
                 f"re-encoded by {os.path.realpath(tiny_teacher)}/vae (see --teacher_latent_transcode"),
    }
    for name, (changes, expected) in cases.items():
        with pytest.raises(LatentCacheError) as error:
            run(**changes)
        message = str(error.value)
        assert "\n" not in message and expected in message and message.endswith(
            "rebuild it with precompute_teacher_latents.py"), (name, message)

    # A raw-latent cache (SD-Turbo-shaped teacher) for a run that transcodes: refused the other way round.
    folder, small_prompts = small_cache
    transcoding = make_cache_settings(tiny_teacher, 64, (4, 8, 8), 1, 0.0, 3, small_prompts, transcode=True, base=tiny_base)
    with pytest.raises(LatentCacheError, match=r"holds the teacher's own latents \(no transcoding\), this run asks "
                                               r"for latents decoded by .*/vae and re-encoded by .*/vae"):
        check_cache(folder, transcoding)
    # Caches written before the route was recorded hold the teacher's own latents: still read as such.
    old = json.loads((folder / "cache_info.json").read_text())
    for key in ("latent_transcode", "teacher_vae", "base_vae"):
        del old[key]
    legacy = folder.parent / "legacy_cache"
    shutil.copytree(folder, legacy)
    (legacy / "cache_info.json").write_text(json.dumps(old))
    raw_settings = make_cache_settings(tiny_teacher, 64, (4, 8, 8), 1, 0.0, 3, small_prompts)
    assert check_cache(legacy, raw_settings)["num_prompts"] == 13
    with pytest.raises(LatentCacheError, match="holds the teacher's own latents"):
        check_cache(legacy, transcoding)


# ---- image caches: the base VAE's latents of an imagefolder (precompute_teacher_latents.py --train_data_dir) ----

NUM_IMAGES = 11  # 8 positions in shard 0, 3 in shard 1: the remainder is encoded one position at a time
CORRUPT_ROW = 5  # its slot takes the next readable image of the epoch's order, on the fly and in the cache
IMAGE_CAPTIONS = ["a red square", "a blue circle", "a green line", "a yellow dot"]


def write_image_folder(folder, captions=None):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    captions = captions or [f"{IMAGE_CAPTIONS[i % 4]}, number {i}" for i in range(NUM_IMAGES)]
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, caption in enumerate(captions):
            path = folder / f"{i:03d}.png"
            if i == CORRUPT_ROW:
                path.write_bytes(b"\x89PNG truncated")
            else:  # not square: resize and crop do work
                Image.fromarray((np.random.default_rng(i).random((80, 72, 3)) * 255).astype(np.uint8)).save(path)
            handle.write(json.dumps({"file_name": path.name, "text": caption}) + "\n")
    return folder


def image_cache_args(base, folder, output_dir, **extra):
    args = ["--pretrained_model_name_or_path", base, "--train_data_dir", folder, "--resolution", "64", "--random_flip",
            "--seed", "0", "--train_batch_size", "4", "--shard_size", "8", "--num_train_epochs", "2", "--output_dir", output_dir]
    for key, value in extra.items():
        args += [f"--{key}"] + ([] if value is True else [str(value)])
    return [str(a) for a in args]


def image_train_args(base, folder, output_dir, steps, random_flip=True, **extra):
    """train_yoso_lora.py on the image folder (no teacher: it is neither checked nor loaded)."""
    flip = {"random_flip": True} if random_flip else {}
    args = tiny_train_args(base, "./no/teacher/needed", "unused.jsonl", output_dir, steps=steps, report_to="none",
                           **flip, **extra)
    i = args.index("--train_data")
    return [str(a) for a in args[:i] + args[i + 2:] + ["--train_data_dir", folder]]


@pytest.fixture(scope="module")
def image_cache(tiny_base, tmp_path_factory):
    """precompute_teacher_latents.py on an 11-image folder: 2 epochs, shards of 8, VAE batches of 4. Launched like
    the training runs it is compared with (CPU kernels may round differently with another thread count)."""
    root = tmp_path_factory.mktemp("image_cache")
    folder = write_image_folder(root / "images")
    result = launch(image_cache_args(tiny_base, folder, root / "cache"), script="precompute_teacher_latents.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 slots hold the next readable image in place of an unreadable one" in result.stdout
    return root / "cache", folder


def image_source(base, folder, batch_size=4, world_size=1, rank=0, **extra):
    """The on-the-fly training's image source for these flags (what train_yoso_lora.py opens)."""
    from train_yoso_lora import parse_args
    from yoso.data.image_data import open_image_source

    args = parse_args(image_train_args(base, folder, "unused", steps=1, train_batch_size=batch_size, **extra))
    return open_image_source(args, rank=rank, world_size=world_size)


def test_image_cache_holds_the_on_the_fly_latents_of_every_slot(image_cache, tiny_base):
    from diffusers import AutoencoderKL

    from yoso.data.image_processing import encode_images, latent_generators
    from yoso.data.latent_cache import LatentCacheReader, epoch_order, folder_fingerprint
    from yoso.data.tar_shards import UnreadableSample

    cache, folder = image_cache
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["kind"] == "images" and info["num_samples"] == NUM_IMAGES and info["num_epochs"] == 2
    assert info["shards_per_epoch"] == 2 and info["shard_size"] == 8 and info["batch_size"] == 4
    assert info["latent_shape"] == [4, 8, 8] and info["dtype"] == "float32" and info["mixed_precision"] == "no"
    assert info["center_crop"] is False and info["random_flip"] is True and info["seed"] == 0
    assert info["base_vae"] == f"{os.path.realpath(tiny_base)}/vae"
    assert info["image_data"]["folder_sha256"] == folder_fingerprint(folder) and info["image_data"]["dataset"] is None
    assert info["image_data"]["caption_column"] == "text" and info["image_data_flag"] == f"--train_data_dir {folder}"

    reader = LatentCacheReader(cache)
    source = image_source(tiny_base, folder)
    vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    for epoch in (0, 1):
        order = epoch_order(NUM_IMAGES, 0, epoch).tolist()
        used = reader.sample_ids(epoch, order)
        # Every slot holds its own row, but the corrupt image's slot holds the next readable row of the order.
        bad = order.index(CORRUPT_ROW)
        assert [p for p in range(NUM_IMAGES) if used[p] != order[p]] == [bad]
        assert used[bad] == (order[bad + 1] if bad + 1 < NUM_IMAGES else order[bad - 1])
        with pytest.raises(UnreadableSample):
            source.load_sample(CORRUPT_ROW, epoch)
        cached, captions = reader.latents(epoch, order), reader.prompts(epoch, order)
        for position, row in enumerate(used):
            sample = source.load_sample(row, epoch)  # crop, flip and caption of (seed, epoch, row)
            expected = encode_images(vae, sample.pixel_values[None], latent_generators(0, epoch, [row]))
            assert rel(cached[position:position + 1], expected) <= TOL, (epoch, position)
            assert captions[position] == sample.caption == f"{IMAGE_CAPTIONS[row % 4]}, number {row}"
    assert not torch.equal(reader.latents(0, [1]), reader.latents(1, [1]))  # another crop, flip and noise each epoch


def take_batches(data, models, n, start_batch=0):
    return [batch for _, batch in zip(range(n), data.batches(models, start_batch))]


def test_cached_image_batches_equal_the_on_the_fly_ones_for_any_ranks_and_resume(image_cache, tiny_base):
    """yoso.data.training_data: CachedImageData (no VAE at all) yields the batches ImageData computes from the images."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from yoso.data.latent_cache import LatentCacheReader
    from yoso.data.training_data import CachedImageData, ImageData

    cache, folder = image_cache
    tokenizer = CLIPTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")
    on_the_fly = SimpleNamespace(tokenizer=tokenizer, vae=AutoencoderKL.from_pretrained(tiny_base, subfolder="vae"))
    cached_models = SimpleNamespace(tokenizer=tokenizer, vae=None)  # a cached run never touches the VAE
    reader = LatentCacheReader(cache)
    for world_size, batch_size in ((1, 4), (2, 2)):
        skipped = 0
        for rank in range(world_size):
            live = ImageData(image_source(tiny_base, folder, batch_size, world_size, rank), seed=0)
            cached = CachedImageData(NUM_IMAGES, batch_size, world_size, rank, 0, cache)
            cached.latent_cache = reader
            assert cached.batches_per_epoch == live.batches_per_epoch == 2
            expected = take_batches(live, on_the_fly, 4)  # 2 epochs
            got = take_batches(cached, cached_models, 4)
            assert [b["epoch"] for b in got] == [0, 0, 1, 1]
            for a, b in zip(got, expected):
                assert a["indices"] == b["indices"] and a["prompts"] == b["prompts"] and a["epoch"] == b["epoch"]
                assert torch.equal(a["input_ids"], b["input_ids"])
                assert rel(a["latents"], b["latents"]) <= TOL
            assert cached.skipped == live.skipped  # the corrupt image counts alike
            skipped += cached.skipped
            # Resuming after 3 batches yields the tail of the uninterrupted sequence.
            tail = CachedImageData(NUM_IMAGES, batch_size, world_size, rank, 0, cache)
            tail.latent_cache = reader
            resumed = take_batches(tail, cached_models, 1, start_batch=3)[0]
            assert resumed["indices"] == got[3]["indices"] and torch.equal(resumed["latents"], got[3]["latents"])
        assert skipped == 1  # epoch 0 puts the corrupt row in a slot (epoch 1 in its unused remainder)


def test_image_cache_refusals_name_what_differs_in_one_line(image_cache, small_cache, tiny_base, tiny_teacher, tmp_path,
                                                           capsys):
    import precompute_teacher_latents
    from train_yoso_lora import parse_args
    from yoso.data.latent_cache import LatentCacheError, check_cache_for_run

    cache, folder = image_cache

    def check(data=folder, teacher_latent_cache=cache, **extra):
        args = parse_args(image_train_args(tiny_base, data, tmp_path / "out", steps=1,
                                           teacher_latent_cache=teacher_latent_cache, **extra))
        return check_cache_for_run(args, None, None)  # as main calls it for an image run (no prompts, no teacher)

    assert check()["num_samples"] == NUM_IMAGES
    assert check(data=shutil.copytree(folder, tmp_path / "moved"))["num_samples"] == NUM_IMAGES  # same data elsewhere
    edited = write_image_folder(tmp_path / "edited", [f"caption {i}" for i in range(NUM_IMAGES)])
    tar_folder = tmp_path / "shards"
    tar_folder.mkdir()
    shutil.make_archive(str(tar_folder / "00000"), "tar", root_dir=folder, base_dir="000.png")
    flag = f"--teacher_latent_cache {cache}"
    cases = {
        "resolution": (dict(resolution=128), f"{flag} was made with --resolution 64 and latent shape [4, 8, 8], this run "
                                             "asks for --resolution 128 and latent shape [4, 16, 16]: "),
        "crop": (dict(center_crop=True), f"{flag} was made with --center_crop off, this run asks for --center_crop on: "),
        "flip": (dict(random_flip=False), f"{flag} was made with --random_flip on, this run asks for --random_flip off: "),
        "seed and subset": (dict(seed=1, max_train_samples=10),
                            f"{flag} was made with --max_train_samples None and --seed 0, this run asks for "
                            "--max_train_samples 10 and --seed 1: "),
        "data": (dict(data=edited), f"{flag} was made from --train_data_dir {folder}, this run reads --train_data_dir "
                                    f"{edited}: "),
        "base VAE": (dict(pretrained_model_name_or_path=tiny_teacher),
                     f"{flag} holds latents encoded by {os.path.realpath(tiny_base)}/vae, this run's base VAE is "
                     f"{os.path.realpath(tiny_teacher)}/vae (--pretrained_model_name_or_path): "),
        "teacher cache": (dict(teacher_latent_cache=small_cache[0]),
                          f"--teacher_latent_cache {small_cache[0]} holds the teacher's latents of 13 prompts, this run "
                          f"trains on the images of --train_data_dir {folder}: precompute their latents with "
                          f"precompute_teacher_latents.py --train_data_dir {folder}, or drop --teacher_latent_cache"),
        "streamed": (dict(data=tar_folder), f"{flag}: --train_data_dir {tar_folder} (tar shards) is streamed, and a "
                                            "latent cache needs map-style data"),
    }
    for name, (changes, expected) in cases.items():
        if name == "base VAE":
            changes = dict(changes)
            base = changes.pop("pretrained_model_name_or_path")
            args = parse_args(image_train_args(tiny_base, folder, tmp_path / "out", steps=1, teacher_latent_cache=cache))
            args.pretrained_model_name_or_path = base
            call = lambda: check_cache_for_run(args, None, None)  # noqa: E731
        else:
            call = lambda: check(**changes)  # noqa: E731
        with pytest.raises(LatentCacheError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and message.startswith(expected), (name, message)

    # train_yoso_lora.py: an image cache for a prompt run, and for an image run with other flags, stop it in one
    # line before anything is written.
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=8)
    message = run_main(tiny_train_args(tiny_base, tiny_teacher, prompts, tmp_path / "a", teacher_latent_cache=cache))
    assert message == (f"train_yoso_lora.py: error: {flag} holds base-VAE latents of the images of --train_data_dir "
                       f"{folder}, this run trains on prompts through the teacher: give --train_data_dir {folder} to "
                       "train on those images, or rebuild it with precompute_teacher_latents.py from --train_data")
    message = run_main(image_train_args(tiny_base, folder, tmp_path / "b", steps=1, teacher_latent_cache=cache,
                                        center_crop=True))
    assert message == (f"train_yoso_lora.py: error: {flag} was made with --center_crop off, this run asks for "
                       "--center_crop on: rebuild it with precompute_teacher_latents.py")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    # precompute_teacher_latents.py: streamed data, and a cache of other settings in --output_dir, exit 2 in one line.
    capsys.readouterr()
    for argv, expected in (
            (image_cache_args(tiny_base, tar_folder, tmp_path / "c"),
             f"error: --train_data_dir {tar_folder} (tar shards) is streamed, and a latent cache needs map-style data"),
            (image_cache_args(tiny_base, folder, cache, center_crop=True),
             f"error: --output_dir {cache} holds a cache made with other settings; use an empty --output_dir")):
        with pytest.raises(SystemExit) as exit_info:
            precompute_teacher_latents.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in err and expected in err, err
    assert not (tmp_path / "c").exists()


# ---- image caches end to end: 2 precompute processes, training from the cache equals training on the images ----

IMAGE_STEPS = 4  # 11 images / batch 4 = 2 batches an epoch: the runs cross into epoch 1


def test_two_processes_precompute_the_same_image_cache(image_cache, tiny_base, tmp_path):
    """Each process takes every other shard (2 have whole VAE batches, 2 only the epoch's remainder)."""
    cache, folder = image_cache
    split = tmp_path / "split"
    result = launch(image_cache_args(tiny_base, folder, split), num_processes=2, script="precompute_teacher_latents.py")
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in cache.glob("latents-*.safetensors"))
    assert sorted(p.name for p in split.glob("latents-*.safetensors")) == names and len(names) == 4
    for name in names:
        a, b = load_file(cache / name), load_file(split / name)
        assert a.keys() == b.keys() == {"latents", "indices", "sample_ids", "prompt_bytes", "prompt_offsets"}
        assert all(torch.equal(a[k], b[k]) for k in a), name
    made, again = (json.loads((c / "cache_info.json").read_text()) for c in (cache, split))
    assert made == again


def test_training_from_the_image_cache_equals_training_on_the_images(image_cache, tiny_base, tmp_path):
    cache, folder = image_cache
    runs = {}
    for mode, extra in (("images", {}), ("cache", {"teacher_latent_cache": cache})):
        out = tmp_path / mode
        result = launch(image_train_args(tiny_base, folder, out, IMAGE_STEPS, use_ema=True, ema_decay=0.5,
                                         checkpointing_steps=2, **extra), dump=tmp_path / f"dump_{mode}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode] = result.stderr
    assert "no image is read, decoded or VAE-encoded" in runs["cache"] and "unreadable sample" not in runs["cache"]
    assert "unreadable sample skipped" in runs["images"]
    skipped = [line.split(" - ")[-1] for line in runs["images"].splitlines() if "unreadable images skipped" in line]
    assert len(skipped) == 1 and skipped[0] in runs["cache"]  # the same count, from the cache's sample ids
    seen = [json.loads((tmp_path / f"dump_{mode}" / "rank0_indices.json").read_text()) for mode in ("images", "cache")]
    assert seen[0] == seen[1] and len(seen[0]) == IMAGE_STEPS
    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors",
                 "latent_stats.safetensors"):
        assert max_diff(load_file(tmp_path / "cache" / name), load_file(tmp_path / "images" / name)) <= TOL, name
    assert max_diff(load_file(tmp_path / "dump_cache" / "rank0.safetensors"),
                    load_file(tmp_path / "dump_images" / "rank0.safetensors")) <= TOL
    assert load_file(tmp_path / "cache" / "latent_stats.safetensors")["count"].item() == 4 * IMAGE_STEPS

    # Resuming the cached run from its checkpoint-2 (epoch 1 next) gives the uninterrupted result.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "cache" / "checkpoint-2", resumed / "checkpoint-2")
    result = launch(image_train_args(tiny_base, folder, resumed, IMAGE_STEPS, use_ema=True, ema_decay=0.5,
                                     checkpointing_steps=100, resume_from_checkpoint="latest", teacher_latent_cache=cache),
                    dump=tmp_path / "dump_resumed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors",
                 "latent_stats.safetensors"):
        assert max_diff(load_file(resumed / name), load_file(tmp_path / "cache" / name)) <= TOL, name
    assert json.loads((tmp_path / "dump_resumed" / "rank0_indices.json").read_text()) == seen[1][2:]
