"""Where a run's batches come from: prompts (the teacher, or a teacher-latent cache, makes x0 from them)
or images with captions (the base VAE encodes x0, or an image-latent cache holds it). All give the step
the same batch dict ``{"prompts", "input_ids", "indices", "epoch"[, "latents"]}``, sharded per rank and
resumable by the number of batches consumed."""

from yoso.data.prompts import ShardedPromptSampler, prompt_batches, tokenize_prompts


class PromptData:
    """Prompts from ``--train_data``; x0 from the teacher, or from ``latent_cache`` when given."""

    kind = "prompts"

    def __init__(self, prompts, batch_size, world_size, rank, seed):
        self.prompts = prompts
        self.sampler = ShardedPromptSampler(len(prompts), batch_size, world_size, rank, seed)
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.latent_cache = None

    def describe(self):
        return f"{len(self.prompts)} prompts"

    def batches(self, models, start_batch=0):
        for batch in prompt_batches(self.prompts, models.tokenizer, self.sampler, start_batch):
            if self.latent_cache is not None:
                batch["latents"] = self.latent_cache.latents(batch["epoch"], batch["indices"])
            yield batch


class ImageData:
    """Images with captions (``--dataset_name`` / ``--train_data_dir``); x0 = the base VAE's latents of the
    image (a posterior sample whose noise comes from (seed, epoch, sample id), so resuming is exact)."""

    kind = "images"

    def __init__(self, source, seed):
        self.source = source
        self.seed = seed
        self.skipped = 0  # unreadable samples replaced in the batches handed out (the source reads ahead)
        self.batches_per_epoch = source.batches_per_epoch  # None for streams: --max_train_steps is required

    def describe(self):
        return f"images ({type(self.source).__name__})"

    def batches(self, models, start_batch=0):
        from contextlib import closing

        from yoso.data.image_data import prefetch
        from yoso.data.image_processing import encode_images, latent_generators

        with closing(prefetch(self.source.batches(start_batch))) as ahead:  # closing these batches stops the reader
            for batch in ahead:
                self.skipped += batch.skipped
                latents = encode_images(models.vae, batch.pixel_values, latent_generators(self.seed, batch.epoch, batch.ids))
                yield {"prompts": list(batch.captions), "input_ids": tokenize_prompts(models.tokenizer, list(batch.captions)),
                       "indices": list(batch.ids), "epoch": batch.epoch, "latents": latents}


class CachedImageData:
    """Images with captions read back from an image-latent cache (``precompute_teacher_latents.py
    --train_data_dir`` / ``--dataset_name``, see ``yoso.data.latent_cache``): the batches :class:`ImageData` would
    yield on the fly (the same epoch order, rank slices, captions, sample ids and x0), but no image is read,
    decoded or VAE-encoded. ``latent_cache`` (a ``LatentCacheReader``) is set once the run has opened it."""

    kind = "images"

    def __init__(self, num_samples, batch_size, world_size, rank, seed, cache_dir):
        from yoso.data.image_data import ImageDataError

        self.cache_dir = cache_dir
        self.num_samples = num_samples
        if num_samples < batch_size * world_size:  # the same bound as the on-the-fly source
            raise ImageDataError(f"--teacher_latent_cache {cache_dir} holds {num_samples} samples, fewer than one "
                                 f"global batch ({batch_size} x {world_size} processes): lower --train_batch_size")
        # An image dataset's epoch order and rank slices are the prompt sampler's (ImageDatasetSource uses it).
        self.sampler = ShardedPromptSampler(num_samples, batch_size, world_size, rank, seed)
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.skipped = 0  # slots whose own image was unreadable when the cache was made (as counted on the fly)
        self.latent_cache = None

    def describe(self):
        return f"images from the latent cache {self.cache_dir} ({self.num_samples} samples)"

    def batches(self, models, start_batch=0):
        for epoch, _, rows in self.sampler.batches(start_batch):
            ids = self.latent_cache.sample_ids(epoch, rows)
            self.skipped += sum(used != row for used, row in zip(ids, rows))
            captions = self.latent_cache.prompts(epoch, rows)
            yield {"prompts": captions, "input_ids": tokenize_prompts(models.tokenizer, captions), "indices": ids,
                   "epoch": epoch, "latents": self.latent_cache.latents(epoch, rows)}


def open_training_data(args, prompts, accelerator):
    """The run's data for this rank: image data when ``--dataset_name`` / ``--train_data_dir`` is given (read
    from ``--teacher_latent_cache`` when that is an image cache, checked before by ``check_cache_for_run``)."""
    from yoso.data.image_data import open_image_source, uses_image_data

    if uses_image_data(args) and getattr(args, "teacher_latent_cache", None):
        from yoso.data.latent_cache import cache_length, read_cache_info

        return CachedImageData(cache_length(read_cache_info(args.teacher_latent_cache)), args.train_batch_size,
                               accelerator.num_processes, accelerator.process_index, args.seed, args.teacher_latent_cache)
    if uses_image_data(args):
        with accelerator.main_process_first():  # datasets prepares its cache once
            source = open_image_source(args, rank=accelerator.process_index, world_size=accelerator.num_processes)
        return ImageData(source, args.seed)
    return PromptData(prompts, args.train_batch_size, accelerator.num_processes, accelerator.process_index, args.seed)
