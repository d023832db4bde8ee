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
"""

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from .atomic import atomic_path
from .data import ShardedPromptSampler
from .teacher import teacher_noise, teacher_noise_seeds

CACHE_INFO_NAME = "cache_info.json"
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


def shard_file_name(epoch, shard):
    return f"latents-e{epoch:04d}-s{shard:06d}.safetensors"


def num_shards(num_prompts, shard_size):
    return -(-num_prompts // shard_size)


# The route of caches made before transcoding existed: the teacher's own latents.
ROUTE_DEFAULTS = {"latent_transcode": False, "teacher_vae": None, "base_vae": None}


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


def _shard_settings(metadata):
    settings = {key: json.loads(metadata[key]) for key in
                ("teacher", "resolution", "latent_shape", "teacher_num_inference_steps", "teacher_guidance_scale",
                 "seed", "num_prompts", "prompts_sha256", *ROUTE_DEFAULTS) if key in metadata}
    return {**ROUTE_DEFAULTS, **settings} if "teacher" in settings else settings


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
    if metadata.get("format") != CACHE_FORMAT or _shard_settings(metadata) != settings or \
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
                latents = latent_source([prompts[i] for i in indices[b:b + batch_size]], noise)
            chunks.append(latents.detach().to("cpu"))
            if progress is not None:
                progress(len(chunks[-1]))
        prompt_bytes, prompt_offsets = _encode_prompts([prompts[i] for i in indices])
        tensors = {
            "latents": torch.cat(chunks).contiguous(),
            "indices": torch.tensor(indices, dtype=torch.int64),
            "noise_seeds": torch.tensor(seeds, dtype=torch.int64),
            "prompt_bytes": prompt_bytes,
            "prompt_offsets": prompt_offsets,
        }
        _atomic_save(tensors, _shard_metadata(settings, epoch, shard, batch_size), path)
        written += 1
    return written


def write_cache_info(output_dir, settings, num_epochs, shard_size, batch_size, latent_dtype, noise_dtype,
                     mixed_precision="no"):
    """Write ``cache_info.json`` after checking that every shard of every epoch is there."""
    output_dir = Path(output_dir)
    per_epoch = num_shards(settings["num_prompts"], shard_size)
    missing = [shard_file_name(e, s) for e in range(num_epochs) for s in range(per_epoch)
               if not (output_dir / shard_file_name(e, s)).is_file()]
    if missing:
        raise LatentCacheError(f"--output_dir {output_dir}: {len(missing)} shards missing (e.g. {missing[0]}); rerun to complete it")
    info = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        **settings,
        "num_epochs": int(num_epochs),
        "shard_size": int(shard_size),
        "shards_per_epoch": per_epoch,
        "batch_size": int(batch_size),
        "order": "ShardedPromptSampler.epoch_order(epoch): shard s holds positions [s * shard_size, (s + 1) * shard_size)",
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

    ``plan``: the preflight's ``yoso.latent_space.TeacherLatentPlan`` (whether this run transcodes); read
    from the models' configs when not given."""
    from .latent_space import teacher_latent_plan

    cache_dir = args.teacher_latent_cache
    read_cache_info(cache_dir)  # a cache of this format, or a one-line error
    plan = plan or teacher_latent_plan(args)
    settings = make_cache_settings(args.pretrained_teacher_model, args.resolution, plan.latent_shape,
                                   args.teacher_num_inference_steps, args.teacher_guidance_scale, args.seed, prompts,
                                   plan.transcode, getattr(args, "teacher_vae", None),
                                   args.pretrained_model_name_or_path)
    return check_cache(cache_dir, settings)


def epochs_needed(num_micro_steps, batches_per_epoch):
    return -(-num_micro_steps // batches_per_epoch)


def open_cache_for_run(cache_dir, accelerator, weight_dtype, logger, num_micro_steps, batches_per_epoch,
                       train_batch_size):
    """Open the (already checked) cache for a training run; log how it covers the run."""
    reader = LatentCacheReader(cache_dir)
    info = reader.info
    needed = epochs_needed(num_micro_steps, batches_per_epoch)
    logger.info(f"teacher latents from {cache_dir} ({info['num_prompts']} prompts x {info['num_epochs']} epochs, "
                f"{info['dtype']}); the teacher is not loaded")
    if info["batch_size"] != train_batch_size:
        logger.info(f"the cache was computed in teacher batches of {info['batch_size']}, this run trains on batches "
                    f"of {train_batch_size}: its latents equal on-the-fly ones up to kernel rounding, not bit for bit")
    if needed > reader.num_epochs:
        logger.warning(f"this run spans {needed} epochs, the cache {reader.num_epochs}: epoch e reuses the cached "
                       f"latents of epoch e mod {reader.num_epochs} (precompute more with --num_epochs {needed})")
    run_noise = dtype_name(text_dtype(accelerator.autocast, accelerator.device, weight_dtype))
    if info["noise_dtype"] != run_noise or info["mixed_precision"] != accelerator.mixed_precision:
        logger.warning(f"cache made with --mixed_precision {info['mixed_precision']} (noise {info['noise_dtype']}), "
                       f"this run uses {accelerator.mixed_precision} (noise {run_noise}): valid teacher latents, "
                       "but not bit-identical to what this run would generate on the fly")
    return reader


class LatentCacheReader:
    """Random access to a cache: ``reader.latents(epoch, indices)`` -> ``[B, C, h, w]`` in the stored dtype.

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
        self.num_prompts = self.info["num_prompts"]
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
            if metadata.get("epoch") != str(epoch) or metadata.get("shard") != str(shard) or \
                    metadata.get("prompts_sha256") != json.dumps(self.info["prompts_sha256"]):
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
                raise IndexError(f"prompt index {index} outside the cache's {self.num_prompts} prompts")
            shard, row = divmod(int(inverse[index]), self.shard_size)
            yield self._shard(epoch, shard), row

    def rows(self, epoch, indices, name="latents"):
        """Rows of tensor ``name`` for prompt ``indices`` in ``epoch``, in the order given."""
        return torch.cat([handle.get_slice(name)[row:row + 1] for handle, row in self._locate(epoch, indices)])

    def latents(self, epoch, indices):
        return self.rows(epoch, indices, "latents")

    def noise_seeds(self, epoch, indices):
        return self.rows(epoch, indices, "noise_seeds").tolist()

    def prompts(self, epoch, indices):
        texts = []
        for handle, row in self._locate(epoch, indices):
            start, stop = handle.get_slice("prompt_offsets")[row:row + 2].tolist()
            texts.append(bytes(handle.get_slice("prompt_bytes")[start:stop].tolist()).decode("utf-8"))
        return texts

    def close(self):
        self._open.clear()
