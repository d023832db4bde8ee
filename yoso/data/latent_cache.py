"""Teacher-latent cache: the teacher's latents computed once, then read by index during training.

Layout of a cache folder (written by ``precompute_teacher_latents.py``)::

    cache_info.json                         teacher, latent route, resolution, latent shape, steps, guidance,
                                            seed, prompt count and hash, epochs, shard size, batch size, dtypes
    latents-e0000-s000000.safetensors       epoch 0, positions [0, shard_size) of the epoch's prompt order
    latents-e0000-s000001.safetensors       epoch 0, positions [shard_size, 2 * shard_size)
    ...

An epoch's prompt order is the training sampler's permutation (``ShardedPromptSampler.epoch_order``, a
function of the seed and the epoch only). Each shard holds, for its positions: ``latents`` [n, C, h, w]
(in the base model's latent space, in the teacher's output dtype), ``indices`` (the prompt indices there)
and ``noise_seeds`` (int64 [n]), and the prompt texts as UTF-8 bytes (``prompt_bytes`` uint8,
``prompt_offsets`` int64 [n + 1]); its header metadata repeats the settings.

The latent of (epoch e, prompt i) is the teacher's output from the noise seeded by
``teacher_noise_seeds(seed, e, [i])``: what on-the-fly training with the same ``--seed`` generates for
that prompt in that epoch. The *route* those latents took is part of the settings: the teacher's own
latents, or latents transcoded into the base's space (``latent_transcode``, with the VAE that decoded
them, ``teacher_vae``, and the one that re-encoded them, ``base_vae``); a run whose route differs is
refused, so latents of two latent spaces never mix. The teacher is called on consecutive runs of
``batch_size`` positions, which are exactly the per-process batches of a training run with
``--train_batch_size batch_size`` (with any number of processes), so with the same batch size the cached
latents are bit-identical to on-the-fly ones; with another, they differ only by kernel rounding. Training
reads a batch by prompt index through the inverse permutation (one mmap'd ``safe_open`` handle per shard,
a bounded number open at once), so memory does not grow with the cache size.

Epochs beyond the cached ones reuse the cached latents cyclically: epoch e reads epoch e mod E.
The prompt order still changes every epoch (the sampler permutes by epoch); only the teacher noise
repeats. Within the cached epochs, training from the cache equals on-the-fly training.

Image caches (``"kind": "images"``; ``precompute_teacher_latents.py --train_data_dir`` / ``--dataset_name``)
hold, in the same layout, the base VAE's latents of a map-style image dataset: the latent of the sample at
position p of epoch e's order (``yoso.data.image_data.ImageDatasetSource``: the same sampler permutation of the
rows) is ``encode_images`` of that sample with the crop, flip, caption choice and posterior noise of
(seed, e, id), which is what training on the images computes for that slot. ``indices`` holds the epoch's
order (the rows), ``sample_ids`` the rows actually used (they differ where an unreadable image was
replaced by the next readable one, as on the fly) and the prompt texts are the captions. The VAE encodes
runs of ``batch_size`` positions, the per-process batches of a run with that ``--train_batch_size``, so
the latents are bit-identical to on-the-fly ones. Training (``yoso.data.training_data.CachedImageData``) then
reads captions and latents by row, through the same inverse permutation (epochs past the cache reuse
epoch e mod E); no image is read, decoded or encoded. The settings name the data (hub dataset and
config, or a local folder by the contents of its metadata files, so the cache follows a moved folder),
the columns, ``--max_train_samples``, resolution, crop and flip flags, seed and base VAE; a run on other
data, another route or other settings is refused in one line. Streamed data (tar shards, ``--streaming``)
is not cached: its epoch order exists only while it is read and its length is unknown beforehand, while
a cache is random access by position; such data is what does not fit on disk twice anyway.
"""

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from yoso.utils.atomic import atomic_path
from yoso.data.prompts import ShardedPromptSampler
from yoso.data.teacher import teacher_noise, teacher_noise_seeds

CACHE_INFO_NAME = "cache_info.json"
KIND_TEACHER, KIND_IMAGES = "teacher", "images"  # caches written before images existed have no "kind": teacher
CACHE_FORMAT = "yoso-teacher-latent-cache"
CACHE_VERSION = 1
DEFAULT_SHARD_SIZE = 4096
REBUILD_HINT = "rebuild it with precompute_teacher_latents.py"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LatentCacheError(ValueError):
    """A cache that cannot be used for this run; the message is one line naming the flag and the fix."""


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def prompts_digest(prompts):
    """sha256 of the prompt list, order included (each prompt length-prefixed, so no separator can collide)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        data = prompt.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def teacher_identity(path):
    """How a teacher is named in a cache: the resolved folder for a local model, else the hub id as given."""
    text = str(path)
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        return os.path.realpath(expanded)
    return text


def text_dtype(autocast, device, weight_dtype):
    """The dtype of the base text encoder's output under ``autocast`` (the step draws the teacher noise in it).

    A CLIP text encoder ends with a LayerNorm in the frozen weights' dtype; whether autocast keeps that
    in the low precision or upcasts it to fp32 differs between devices (CUDA upcasts, CPU does not), so
    it is asked of torch here rather than assumed.
    """
    norm = torch.nn.LayerNorm(8).to(device=device, dtype=weight_dtype)
    with autocast(), torch.no_grad():
        return norm(torch.zeros(1, 8, device=device, dtype=weight_dtype)).dtype


def cache_kind(info):
    return info.get("kind", KIND_TEACHER)


def cache_length(info):
    """Rows per epoch: prompts of a teacher cache, samples of an image cache."""
    return info["num_samples"] if cache_kind(info) == KIND_IMAGES else info["num_prompts"]


def shard_file_name(epoch, shard):
    return f"latents-e{epoch:04d}-s{shard:06d}.safetensors"


def num_shards(num_prompts, shard_size):
    return -(-num_prompts // shard_size)


# The route of caches made before transcoding existed: the teacher's own latents.
ROUTE_DEFAULTS = {"latent_transcode": False, "teacher_vae": None, "base_vae": None}
# Settings kept for messages only: an image cache still matches its data after the folder moved.
INFORMATIONAL_KEYS = ("image_data_flag",)


def settings_differ(made, settings):
    """Whether a cache (``cache_info.json`` or a shard's settings) was made with other ``settings``."""
    return any(made.get(key, ROUTE_DEFAULTS.get(key)) != value for key, value in settings.items()
               if key not in INFORMATIONAL_KEYS)


def latent_route(teacher, transcode=False, teacher_vae=None, base=None):
    """How the cached latents were made, as JSON values: raw teacher latents (no VAE involved), or decoded by
    ``teacher_vae`` (``--teacher_vae``, else the teacher's ``vae/``) and re-encoded by ``base``'s ``vae/``."""
    if not transcode:
        return dict(ROUTE_DEFAULTS)
    if base is None:
        raise ValueError("a transcoded cache needs the base model whose VAE encodes the latents")
    decoder = teacher_identity(teacher_vae) if teacher_vae else f"{teacher_identity(teacher)}/vae"
    return {"latent_transcode": True, "teacher_vae": decoder, "base_vae": f"{teacher_identity(base)}/vae"}


def describe_route(settings):
    if not settings.get("latent_transcode", False):
        return "the teacher's own latents (no transcoding)"
    return f"latents decoded by {settings['teacher_vae']} and re-encoded by {settings['base_vae']}"


def make_cache_settings(teacher, resolution, latent_shape, num_inference_steps, guidance_scale, seed, prompts,
                        transcode=False, teacher_vae=None, base=None):
    """The settings a cache is made with and checked against (all JSON values). ``latent_shape``: the stored
    (base-space) latents' shape; ``transcode``, ``teacher_vae``, ``base``: the route (:func:`latent_route`)."""
    return {
        "teacher": teacher_identity(teacher),
        **latent_route(teacher, transcode, teacher_vae, base),
        "resolution": int(resolution),
        "latent_shape": [int(s) for s in latent_shape],
        "teacher_num_inference_steps": int(num_inference_steps),
        "teacher_guidance_scale": float(guidance_scale),
        "seed": int(seed),
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_digest(prompts),
    }


def epoch_order(num_prompts, seed, epoch):
    """The training sampler's prompt order for ``epoch`` (independent of batch size and process count)."""
    return ShardedPromptSampler(num_prompts, 1, 1, 0, seed).epoch_order(epoch)


def _shard_metadata(settings, epoch, shard, batch_size):
    meta = {key: json.dumps(value) for key, value in settings.items()}
    meta.update(format=CACHE_FORMAT, version=str(CACHE_VERSION), epoch=str(epoch), shard=str(shard),
                batch_size=str(batch_size))
    return meta


def _shard_settings(metadata, keys):
    """The settings among ``keys`` that a shard's header records (absent route keys: see settings_differ)."""
    return {key: json.loads(metadata[key]) for key in keys if key in metadata}


def _atomic_save(tensors, metadata, path):
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _atomic_write_text(text, path):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _encode_prompts(prompts):
    data = [p.encode("utf-8") for p in prompts]
    offsets = torch.zeros(len(data) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(d) for d in data], dtype=torch.int64).cumsum(0)
    flat = torch.frombuffer(bytearray(b"".join(data)), dtype=torch.uint8) if offsets[-1] > 0 else torch.zeros(0, dtype=torch.uint8)
    return flat.clone(), offsets


def _save_shard(path, settings, epoch, shard, batch_size, chunks, texts, **row_tensors):
    """One shard file, whole or not at all: the latents (``chunks`` in row order), the rows' texts and the
    route's per-row tensors (``indices`` and ``noise_seeds`` or ``sample_ids``)."""
    text_bytes, text_offsets = _encode_prompts(texts)
    tensors = {"latents": torch.cat(chunks).contiguous(), **row_tensors,
               "prompt_bytes": text_bytes, "prompt_offsets": text_offsets}
    _atomic_save(tensors, _shard_metadata(settings, epoch, shard, batch_size), path)


def shard_is_complete(path, settings, epoch, shard, batch_size):
    """True if ``path`` is a finished shard made with ``settings``; LatentCacheError if made with others."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # a truncated file from a killed run: recompute it
        return False
    if metadata.get("format") != CACHE_FORMAT or settings_differ(_shard_settings(metadata, settings), settings) or \
            metadata.get("epoch") != str(epoch) or metadata.get("shard") != str(shard) or \
            metadata.get("batch_size") != str(batch_size):
        raise LatentCacheError(f"--output_dir {path.parent}: {path.name} was made with other settings; "
                               "use an empty --output_dir for a new cache")
    return True


def precompute_latents(output_dir, latent_source, prompts, settings, num_epochs=1, shard_size=DEFAULT_SHARD_SIZE,
                       batch_size=16, rank=0, world_size=1, device="cpu", noise_dtype=torch.float32,
                       autocast=None, progress=None):
    """Compute this rank's share of the shards (round-robin over (epoch, shard)) and write them.

    ``batch_size`` should be the training run's ``--train_batch_size`` (see the module docstring) and must
    divide ``shard_size``. Shards already complete (e.g. from an interrupted run) are skipped, so rerunning
    resumes. Returns the number of shards written. ``cache_info.json`` is written separately, by
    :func:`write_cache_info`, once every rank is done.
    """
    from contextlib import nullcontext

    if shard_size % batch_size:
        raise LatentCacheError(f"--shard_size {shard_size} must be a multiple of the teacher batch size {batch_size}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    autocast = autocast or nullcontext
    # The noise has the teacher's latent shape; the stored latents the base's (equal unless transcoded).
    noise_shape = tuple(latent_source.noise_shape(settings["resolution"]) if hasattr(latent_source, "noise_shape")
                        else settings["latent_shape"])
    per_epoch = num_shards(len(prompts), shard_size)
    work = [(e, s) for e in range(num_epochs) for s in range(per_epoch)][rank::world_size]
    written = 0
    orders = {}
    for epoch, shard in work:
        path = output_dir / shard_file_name(epoch, shard)
        if shard_is_complete(path, settings, epoch, shard, batch_size):
            if progress is not None:
                progress(min(shard_size, len(prompts) - shard * shard_size))
            continue
        if epoch not in orders:
            orders = {epoch: epoch_order(len(prompts), settings["seed"], epoch)}
        start, stop = shard * shard_size, min((shard + 1) * shard_size, len(prompts))
        indices = orders[epoch][start:stop].tolist()
        seeds = teacher_noise_seeds(settings["seed"], epoch, indices)
        chunks = []
        for b in range(0, len(indices), batch_size):
            noise = teacher_noise(seeds[b:b + batch_size], noise_shape, device, noise_dtype)
            with autocast(), torch.no_grad():
                latents = latent_source([prompts[i] for i in indices[b:b + batch_size]], noise, seeds[b:b + batch_size])
            chunks.append(latents.detach().to("cpu"))
            if progress is not None:
                progress(len(chunks[-1]))
        _save_shard(path, settings, epoch, shard, batch_size, chunks, [prompts[i] for i in indices],
                    indices=torch.tensor(indices, dtype=torch.int64), noise_seeds=torch.tensor(seeds, dtype=torch.int64))
        written += 1
    return written


def write_cache_info(output_dir, settings, num_epochs, shard_size, batch_size, latent_dtype, noise_dtype,
                     mixed_precision="no"):
    """Write ``cache_info.json`` after checking that every shard of every epoch is there."""
    output_dir = Path(output_dir)
    per_epoch = num_shards(cache_length(settings), shard_size)
    missing = [shard_file_name(e, s) for e in range(num_epochs) for s in range(per_epoch)
               if not (output_dir / shard_file_name(e, s)).is_file()]
    if missing:
        raise LatentCacheError(f"--output_dir {output_dir}: {len(missing)} shards missing (e.g. {missing[0]}); rerun to complete it")
    order = "ShardedPromptSampler.epoch_order(epoch): shard s holds positions [s * shard_size, (s + 1) * shard_size)"
    if cache_kind(settings) == KIND_IMAGES:
        order += "; indices: the rows in that order, sample_ids: the rows used (an unreadable image's next readable one)"
    info = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        **settings,
        "num_epochs": int(num_epochs),
        "shard_size": int(shard_size),
        "shards_per_epoch": per_epoch,
        "batch_size": int(batch_size),
        "order": order,
        "dtype": dtype_name(latent_dtype),
        "noise_dtype": dtype_name(noise_dtype),
        "mixed_precision": mixed_precision,
        "shard_pattern": "latents-e{epoch:04d}-s{shard:06d}.safetensors",
    }
    _atomic_write_text(json.dumps(info, indent=2) + "\n", output_dir / CACHE_INFO_NAME)
    return info


def read_cache_info(cache_dir, flag="--teacher_latent_cache"):
    path = Path(cache_dir) / CACHE_INFO_NAME
    if not Path(cache_dir).is_dir():
        raise LatentCacheError(f"{flag} {cache_dir}: no such folder (make one with precompute_teacher_latents.py)")
    if not path.is_file():
        raise LatentCacheError(f"{flag} {cache_dir}: no {CACHE_INFO_NAME} there (unfinished or not a cache: "
                               "rerun precompute_teacher_latents.py to complete it)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LatentCacheError(f"{flag} {cache_dir}: unreadable {CACHE_INFO_NAME} ({error}); {REBUILD_HINT}") from None
    if info.get("format") != CACHE_FORMAT or info.get("version") != CACHE_VERSION:
        raise LatentCacheError(f"{flag} {cache_dir}: not a version-{CACHE_VERSION} teacher-latent cache; {REBUILD_HINT}")
    return info


def check_cache(cache_dir, settings):
    """The cache's info if it was made with ``settings`` (see :func:`make_cache_settings`), else a one-line
    LatentCacheError that names what differs and how to fix it."""
    info = read_cache_info(cache_dir)
    flag = f"--teacher_latent_cache {cache_dir}"
    if cache_kind(info) != cache_kind(settings):
        if cache_kind(settings) == KIND_IMAGES:
            data = settings["image_data_flag"]
            raise LatentCacheError(
                f"{flag} holds the teacher's latents of {info['num_prompts']} prompts, this run trains on the images "
                f"of {data}: precompute their latents with precompute_teacher_latents.py {data}, or drop "
                "--teacher_latent_cache")
        data = info["image_data_flag"]
        raise LatentCacheError(
            f"{flag} holds base-VAE latents of the images of {data}, this run trains on prompts through the teacher: "
            f"give {data} to train on those images, or {REBUILD_HINT} from --train_data")
    if cache_kind(info) == KIND_IMAGES:
        return _check_image_cache(info, settings, flag)
    if info["teacher"] != settings["teacher"] or info["resolution"] != settings["resolution"]:
        raise LatentCacheError(
            f"{flag} was made with teacher {info['teacher']} at resolution {info['resolution']}, this run asks for "
            f"{settings['teacher']} at {settings['resolution']}: {REBUILD_HINT}")
    if any(info.get(key, default) != settings[key] for key, default in ROUTE_DEFAULTS.items()):
        raise LatentCacheError(
            f"{flag} holds {describe_route(info)}, this run asks for {describe_route(settings)} (see "
            f"--teacher_latent_transcode, --teacher_vae, --pretrained_model_name_or_path): {REBUILD_HINT}")
    names = {"teacher_num_inference_steps": "--teacher_num_inference_steps",
             "teacher_guidance_scale": "--teacher_guidance_scale", "seed": "--seed", "latent_shape": "latent shape"}
    differ = [key for key in names if info[key] != settings[key]]
    if differ:
        made = " and ".join(f"{names[k]} {info[k]}" for k in differ)
        asked = " and ".join(f"{names[k]} {settings[k]}" for k in differ)
        raise LatentCacheError(f"{flag} was made with {made}, this run asks for {asked}: {REBUILD_HINT}")
    if info["num_prompts"] != settings["num_prompts"] or info["prompts_sha256"] != settings["prompts_sha256"]:
        raise LatentCacheError(
            f"{flag} was made from {info['num_prompts']} other prompts, this run reads {settings['num_prompts']} "
            f"(--train_data / --max_train_samples differ): {REBUILD_HINT}")
    return info


def check_cache_for_run(args, prompts, plan=None):
    """Check ``--teacher_latent_cache`` against a ``train_yoso_lora.py`` run, before any model loads.

    A run on images (``--train_data_dir`` / ``--dataset_name``) needs an image cache of the same data and
    settings (``prompts`` and ``plan`` are then unused: None); a run on prompts a teacher cache.
    ``plan``: the preflight's ``yoso.data.latent_space.TeacherLatentPlan`` (whether this run transcodes); read
    from the models' configs when not given."""
    from yoso.data.image_data import uses_image_data
    from yoso.data.latent_space import teacher_latent_plan

    cache_dir = args.teacher_latent_cache
    read_cache_info(cache_dir)  # a cache of this format, or a one-line error
    if uses_image_data(args):
        refuse_streamed_image_data(args, f"--teacher_latent_cache {cache_dir}")
        return check_cache(cache_dir, make_image_cache_settings(args, image_latent_shape(args)))
    plan = plan or teacher_latent_plan(args)
    settings = make_cache_settings(args.pretrained_teacher_model, args.resolution, plan.latent_shape,
                                   args.teacher_num_inference_steps, args.teacher_guidance_scale, args.seed, prompts,
                                   plan.transcode, getattr(args, "teacher_vae", None),
                                   args.pretrained_model_name_or_path)
    return check_cache(cache_dir, settings)


# ---- image caches -----------------------------------------------------------------------------------------

METADATA_FILE_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # datasets' imagefolder
DATA_FILE_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl")  # a local --dataset_name folder


def folder_fingerprint(folder):
    """sha256 over a local dataset folder's metadata files (contents) and tabular data files (path and size):
    the captions and the image list of an imagefolder, wherever the folder lies. Images themselves are not
    read (that would cost what the cache saves): replacing an image's pixels under the same name goes unseen."""
    digest = hashlib.sha256()
    root = Path(folder).expanduser().resolve()
    # os.walk lists names without a stat per image; a cache_info.json written into the folder is not its data.
    files = sorted(Path(directory, name) for directory, _, names in os.walk(root) for name in names
                   if name in METADATA_FILE_NAMES
                   or (os.path.splitext(name)[1].lower() in DATA_FILE_SUFFIXES and name != CACHE_INFO_NAME))
    for path in files:
        relative = path.relative_to(root).as_posix().encode("utf-8")
        digest.update(len(relative).to_bytes(8, "little") + relative)
        if path.name in METADATA_FILE_NAMES:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(path.stat().st_size.to_bytes(8, "little"))
    return digest.hexdigest()


def image_data_flag(args):
    """The data flag as given, e.g. ``--train_data_dir images`` (for messages)."""
    name = getattr(args, "dataset_name", None)
    return f"--dataset_name {name}" if name else f"--train_data_dir {args.train_data_dir}"


def image_data_identity(args):
    """Which images a cache holds, as JSON values: the route, a hub dataset's name and config or a local
    folder's fingerprint (not its path: the cache follows a moved folder), the columns and
    ``--max_train_samples``."""
    from yoso.data.image_data import _image_column, image_data_route, resolve_caption_column

    value = getattr(args, "dataset_name", None) or args.train_data_dir
    local = Path(str(value)).expanduser().is_dir()
    return {
        "route": image_data_route(args),
        "dataset": None if local else str(value),
        "dataset_config_name": getattr(args, "dataset_config_name", None),
        "folder_sha256": folder_fingerprint(value) if local else None,
        "image_column": _image_column(args),
        "caption_column": resolve_caption_column(args),
        "max_train_samples": getattr(args, "max_train_samples", None),
    }


def refuse_streamed_image_data(args, flag=None):
    """Streamed image data cannot be cached (see the module docstring): a one-line LatentCacheError."""
    from yoso.data.image_data import STREAMED_ROUTES, ROUTE_TAR, image_data_route

    route = image_data_route(args)
    if route in STREAMED_ROUTES:
        kind = "tar shards" if route == ROUTE_TAR else "--streaming"
        where = f"{flag}: " if flag else ""
        raise LatentCacheError(
            f"{where}{image_data_flag(args)} ({kind}) is streamed, and a latent cache needs map-style data (an epoch's "
            "order it can index; a stream's exists only while it is read): train on it without a cache, or use an "
            "imagefolder / a --dataset_name without --streaming")


def image_latent_shape(args):
    """The base VAE's latent shape at ``--resolution`` (from config files only; the resolution is checked)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from yoso.utils.model_configs import check_resolution, load_model_config, vae_scale_factor

    base, hub = args.pretrained_model_name_or_path, {"revision": getattr(args, "revision", None),
                                                      "cache_dir": getattr(args, "cache_dir", None)}
    vae = load_model_config("--pretrained_model_name_or_path", base, "vae", AutoencoderKL, **hub)
    unet = load_model_config("--pretrained_model_name_or_path", base, "unet", UNet2DConditionModel, **hub)
    check_resolution(args.resolution, vae, unet)
    side = args.resolution // vae_scale_factor(vae)
    return (int(vae.get("latent_channels", 4)), side, side)


def make_image_cache_settings(args, latent_shape, num_samples=None):
    """The settings of an image cache (all JSON values): the data, the base VAE, the pixel route (resolution,
    crop, flip) and the seed of every per-sample random choice. ``num_samples`` (known once the dataset is
    loaded) is recorded by the precompute; a run's check compares the rest."""
    settings = {
        "kind": KIND_IMAGES,
        "image_data": image_data_identity(args),
        "image_data_flag": image_data_flag(args),  # for messages; not compared (see INFORMATIONAL_KEYS)
        "base_vae": f"{teacher_identity(args.pretrained_model_name_or_path)}/vae",
        "resolution": int(args.resolution),
        "latent_shape": [int(s) for s in latent_shape],
        "center_crop": bool(getattr(args, "center_crop", False)),
        "random_flip": bool(getattr(args, "random_flip", False)),
        "seed": int(args.seed),
    }
    if num_samples is not None:
        settings["num_samples"] = int(num_samples)
    return settings


def _check_image_cache(info, settings, flag):
    made, asked = info["image_data"], settings["image_data"]
    same_source = all(made[k] == asked[k] for k in ("route", "dataset", "dataset_config_name", "folder_sha256"))
    if not same_source:
        what = ""
        if made["folder_sha256"] and asked["folder_sha256"] and info["image_data_flag"] == settings["image_data_flag"]:
            what = " (its metadata files changed since)"
        elif made["dataset_config_name"] != asked["dataset_config_name"]:
            what = f" (--dataset_config_name {made['dataset_config_name']}, this run {asked['dataset_config_name']})"
        raise LatentCacheError(f"{flag} was made from {info['image_data_flag']}{what}, this run reads "
                               f"{settings['image_data_flag']}: {REBUILD_HINT}")
    if info["base_vae"] != settings["base_vae"]:
        raise LatentCacheError(f"{flag} holds latents encoded by {info['base_vae']}, this run's base VAE is "
                               f"{settings['base_vae']} (--pretrained_model_name_or_path): {REBUILD_HINT}")
    names = {"image_column": "--image_column", "caption_column": "--caption_column",
             "max_train_samples": "--max_train_samples"}
    differ = [(names[k], made[k], asked[k]) for k in names if made[k] != asked[k]]
    names = {"resolution": "--resolution", "center_crop": "--center_crop", "random_flip": "--random_flip",
             "seed": "--seed", "latent_shape": "latent shape"}
    differ += [(names[k], info[k], settings[k]) for k in names if info[k] != settings[k]]
    if differ:
        def value(v):
            return ("on" if v else "off") if isinstance(v, bool) else v

        made_text = " and ".join(f"{name} {value(a)}" for name, a, _ in differ)
        asked_text = " and ".join(f"{name} {value(b)}" for name, _, b in differ)
        raise LatentCacheError(f"{flag} was made with {made_text}, this run asks for {asked_text}: {REBUILD_HINT}")
    return info


def precompute_image_latents(output_dir, vae, open_source, settings, num_epochs=1, shard_size=DEFAULT_SHARD_SIZE,
                             batch_size=16, rank=0, world_size=1, progress=None):
    """This rank's share (round-robin over (epoch, shard)) of an image cache: the base VAE's latents of the
    samples at each position of each epoch's order, with their captions and ids.

    ``open_source(batch_size)``: a ``yoso.data.image_data.ImageDatasetSource`` over the whole dataset as one process
    sees it (world size 1) in batches of ``batch_size``; its batches are the training's slots, bad samples
    replaced alike. ``batch_size`` (the training run's ``--train_batch_size``) must divide ``shard_size``: the VAE
    then encodes exactly the per-process batches of training. ``settings``: :func:`make_image_cache_settings`
    with ``num_samples``. Finished shards are skipped (rerunning resumes). Returns the number of shards written.
    """
    from itertools import islice

    from yoso.data.image_processing import encode_images, latent_generators

    if shard_size % batch_size:
        raise LatentCacheError(f"--shard_size {shard_size} must be a multiple of --train_batch_size {batch_size}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    count, seed = settings["num_samples"], settings["seed"]
    per_epoch = num_shards(count, shard_size)
    work = [(e, s) for e in range(num_epochs) for s in range(per_epoch)][rank::world_size]
    sources = {}
    written = 0
    for epoch, shard in work:
        path = output_dir / shard_file_name(epoch, shard)
        start, stop = shard * shard_size, min((shard + 1) * shard_size, count)
        if shard_is_complete(path, settings, epoch, shard, batch_size):
            if progress is not None:
                progress(stop - start)
            continue
        # Whole batches of batch_size, then (last shard only) the epoch's remainder one position at a time:
        # the source's batches are positions of the epoch's order, so both views see the same samples.
        full = (stop - start) // batch_size
        runs = [(batch_size, epoch * (count // batch_size) + start // batch_size, full),
                (1, epoch * count + start + full * batch_size, stop - start - full * batch_size)]
        ids, captions, chunks = [], [], []
        for size, first_batch, num_batches in runs:
            if num_batches == 0:
                continue
            if size not in sources:
                sources[size] = open_source(size)
            batches = sources[size].batches(first_batch)
            for batch in islice(batches, num_batches):
                if batch.epoch != epoch:
                    raise RuntimeError(f"image source at epoch {batch.epoch}, expected {epoch}")  # a bug, not input
                latents = encode_images(vae, batch.pixel_values, latent_generators(seed, epoch, batch.ids))
                chunks.append(latents.detach().to("cpu", torch.float32))
                ids += [int(i) for i in batch.ids]
                captions += list(batch.captions)
                if progress is not None:
                    progress(len(batch.ids))
            batches.close()
        _save_shard(path, settings, epoch, shard, batch_size, chunks, captions,
                    indices=epoch_order(count, seed, epoch)[start:stop].clone(),
                    sample_ids=torch.tensor(ids, dtype=torch.int64))
        written += 1
    return written


def epochs_needed(num_micro_steps, batches_per_epoch):
    return -(-num_micro_steps // batches_per_epoch)


def open_cache_for_run(cache_dir, accelerator, weight_dtype, logger, num_micro_steps, batches_per_epoch,
                       train_batch_size):
    """Open the (already checked) cache for a training run; log how it covers the run."""
    reader = LatentCacheReader(cache_dir)
    info = reader.info
    needed = epochs_needed(num_micro_steps, batches_per_epoch)
    if cache_kind(info) == KIND_IMAGES:
        return _open_image_cache(reader, accelerator, logger, needed, train_batch_size)
    logger.info(f"teacher latents from {cache_dir} ({info['num_prompts']} prompts x {info['num_epochs']} epochs, "
                f"{info['dtype']}); the teacher is not loaded")
    if info["batch_size"] != train_batch_size:
        logger.info(f"the cache was computed in teacher batches of {info['batch_size']}, this run trains on batches "
                    f"of {train_batch_size}: its latents equal on-the-fly ones up to kernel rounding, not bit for bit")
    if needed > reader.num_epochs:
        logger.warning(f"this run spans {needed} epochs, the cache {reader.num_epochs}: epoch e reuses the cached "
                       f"latents of epoch e mod {reader.num_epochs} (precompute more with --num_train_epochs {needed})")
    run_noise = dtype_name(text_dtype(accelerator.autocast, accelerator.device, weight_dtype))
    if info["noise_dtype"] != run_noise or info["mixed_precision"] != accelerator.mixed_precision:
        logger.warning(f"cache made with --mixed_precision {info['mixed_precision']} (noise {info['noise_dtype']}), "
                       f"this run uses {accelerator.mixed_precision} (noise {run_noise}): valid teacher latents, "
                       "but not bit-identical to what this run would generate on the fly")
    return reader


def _open_image_cache(reader, accelerator, logger, epochs, train_batch_size):
    info = reader.info
    logger.info(f"image latents from {reader.cache_dir} ({info['num_samples']} samples of {info['image_data_flag']} x "
                f"{info['num_epochs']} epochs, {info['dtype']}): no image is read, decoded or VAE-encoded")
    if info["batch_size"] != train_batch_size:
        logger.info(f"the cache was VAE-encoded in batches of {info['batch_size']}, this run trains on batches of "
                    f"{train_batch_size}: its latents equal on-the-fly ones up to kernel rounding, not bit for bit")
    if epochs > reader.num_epochs:
        logger.warning(f"this run spans {epochs} epochs, the cache {reader.num_epochs}: epoch e reuses the cached "
                       f"crops, flips and latents of epoch e mod {reader.num_epochs} (precompute more with "
                       f"--num_train_epochs {epochs})")
    if info["mixed_precision"] != accelerator.mixed_precision:
        logger.warning(f"cache made with --mixed_precision {info['mixed_precision']}, this run uses "
                       f"{accelerator.mixed_precision}: valid latents, but the VAE would compute them on the fly in "
                       "another dtype")
    return reader


class LatentCacheReader:
    """Random access to a cache: ``reader.latents(epoch, indices)`` -> ``[B, C, h, w]`` in the stored dtype.
    ``indices`` are prompt indices, or for an image cache the rows of the epoch's order (``sample_ids`` gives
    the rows actually used there, ``prompts`` the captions).

    A prompt index is mapped to its position in the epoch's order (the inverse permutation, kept for the
    last two epochs read), then to (shard, row). Shards are opened lazily with ``safe_open`` (memory-mapped;
    only the rows asked for are read) and at most ``max_open_shards`` stay open; on opening, a shard's
    stored indices are checked against the order. Epochs past the cached ones read epoch ``epoch % num_epochs``.
    """

    def __init__(self, cache_dir, max_open_shards=32):
        self.cache_dir = Path(cache_dir)
        self.info = read_cache_info(cache_dir)
        self.num_epochs = self.info["num_epochs"]
        self.shard_size = self.info["shard_size"]
        self.num_prompts = cache_length(self.info)  # rows per epoch: prompts, or an image cache's samples
        self.seed = self.info["seed"]
        self.batch_size = self.info["batch_size"]
        self.latent_shape = tuple(self.info["latent_shape"])
        self.dtype = _DTYPES[self.info["dtype"]]
        self.max_open_shards = max_open_shards
        self._open = OrderedDict()
        self._orders = OrderedDict()
        missing = [shard_file_name(e, s) for e in range(self.num_epochs) for s in range(self.info["shards_per_epoch"])
                   if not (self.cache_dir / shard_file_name(e, s)).is_file()]
        if missing:
            raise LatentCacheError(f"--teacher_latent_cache {cache_dir}: {len(missing)} shard files missing "
                                   f"(e.g. {missing[0]}): {REBUILD_HINT}")

    def cached_epoch(self, epoch):
        return int(epoch) % self.num_epochs

    def _order(self, epoch):
        """(order, inverse) of a cached epoch."""
        pair = self._orders.get(epoch)
        if pair is None:
            order = epoch_order(self.num_prompts, self.seed, epoch)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(self.num_prompts)
            pair = self._orders[epoch] = (order, inverse)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return pair

    def _shard(self, epoch, shard):
        from safetensors import safe_open

        key = (epoch, shard)
        handle = self._open.get(key)
        if handle is None:
            name = shard_file_name(epoch, shard)
            handle = safe_open(str(self.cache_dir / name), framework="pt")
            metadata = handle.metadata() or {}
            start = shard * self.shard_size
            order = self._order(epoch)[0][start:start + self.shard_size]
            identity = "image_data" if cache_kind(self.info) == KIND_IMAGES else "prompts_sha256"
            if metadata.get("epoch") != str(epoch) or metadata.get("shard") != str(shard) or \
                    json.loads(metadata.get(identity, "null")) != self.info[identity]:
                raise LatentCacheError(f"--teacher_latent_cache {self.cache_dir}: {name} belongs to another cache: "
                                       f"{REBUILD_HINT}")
            if not torch.equal(handle.get_tensor("indices"), order):
                raise LatentCacheError(f"--teacher_latent_cache {self.cache_dir}: {name} holds another prompt order "
                                       f"than this code's sampler: {REBUILD_HINT}")
            self._open[key] = handle
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(key)
        return handle

    def _locate(self, epoch, indices):
        epoch = self.cached_epoch(epoch)
        inverse = self._order(epoch)[1]
        for index in indices:
            index = int(index)
            if not 0 <= index < self.num_prompts:
                raise IndexError(f"index {index} outside the cache's {self.num_prompts} rows")
            shard, row = divmod(int(inverse[index]), self.shard_size)
            yield self._shard(epoch, shard), row

    def rows(self, epoch, indices, name="latents"):
        """Rows of tensor ``name`` for prompt ``indices`` in ``epoch``, in the order given."""
        return torch.cat([handle.get_slice(name)[row:row + 1] for handle, row in self._locate(epoch, indices)])

    def latents(self, epoch, indices):
        return self.rows(epoch, indices, "latents")

    def noise_seeds(self, epoch, indices):
        return self.rows(epoch, indices, "noise_seeds").tolist()

    def sample_ids(self, epoch, indices):
        """An image cache's rows used for the slots of rows ``indices`` (another where an image was unreadable)."""
        return self.rows(epoch, indices, "sample_ids").tolist()

    def prompts(self, epoch, indices):
        texts = []
        for handle, row in self._locate(epoch, indices):
            start, stop = handle.get_slice("prompt_offsets")[row:row + 2].tolist()
            texts.append(bytes(handle.get_slice("prompt_bytes")[start:stop].tolist()).decode("utf-8"))
        return texts

    def close(self):
        self._open.clear()
