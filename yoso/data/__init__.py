"""Where the training latents come from, and the data preparation around it.

- ``prompts``           prompt files and the resumable, rank-sharded prompt sampler
- ``teacher``           the teacher pipeline (SD-Turbo) that turns prompts into training latents
- ``latent_space``      teacher vs base latent spaces: config-only check, VAE transcoding (SDXL-Turbo)
- ``latent_cache``      precomputed teacher latents (train without loading the teacher)
- ``latent_stats``      mean/std of the training latents for one-step IPI sampling
- ``image_data``        real image-caption data instead of the teacher: routes, preflight, sharded batches
- ``image_processing``  one image sample: decode, resize/crop/flip, VAE latents, randomness per (seed, epoch, id)
- ``tar_shards``        webdataset-style tar shards read lazily
- ``training_data``     a run's batches, one format for every route
- ``journeydb``         JourneyDB annotations -> clean prompt file (``prepare_journeydb.py``)
- ``clip_bpe``          SD1.5's CLIP BPE tokenizer rebuilt offline
"""
