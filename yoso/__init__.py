"""YOSO-LoRA: one- and two-step Stable Diffusion 1.5 via a self-cooperative diffusion GAN (arXiv 2403.12931).

One concept per module:

- ``schedule``      noise schedule, x0 from UNet output, LCM boundary scalings, loss weights
- ``unet_encoder``  the UNet's encoder half (feature net F, discriminator trunk), adapter/checkpointing switches
- ``discriminator`` D: encoder half + GroupNorm + attention pooling head
- ``losses``        consistency, data ("KL") and GAN losses
- ``ema``           in-place fp32 EMA of the LoRA
- ``health``        training-health signals (D accuracy, gradient norms, EMA distance) and the --health_window warnings
- ``lora``          LoRA config, targets, save/load in diffusers format
- ``kohya``         the LoRA in kohya format (AUTOMATIC1111, ComfyUI), with the trained alpha
- ``data``          prompt files and the resumable, rank-sharded prompt sampler
- ``teacher``       teacher pipeline (SD-Turbo) that turns prompts into training latents
- ``image_data``    real image-caption data instead of the teacher: routes, preflight, resumable rank-sharded batches
- ``image_processing`` one image sample: decode, resize/crop/flip, VAE latents, randomness per (seed, epoch, id)
- ``tar_shards``    webdataset-style tar shards read lazily (headers scanned, a rank reads its own samples)
- ``training_data`` a run's batches: prompts (teacher or cache) or images (base VAE), one batch format
- ``latent_space``  teacher vs base latent spaces: config-only check, VAE decode/encode transcoding (SDXL-Turbo)
- ``latent_stats``  mean/std of the training latents for one-step IPI sampling: accumulated, saved, loaded
- ``latent_cache``  precomputed teacher latents (train without loading the teacher)
- ``models``        loading and placing every model of a run (shared by script, tests, benchmarks)
- ``step``          one YOSO training step (the D update, the G update, EMA)
- ``precision``     fp16 with two optimizers: D's own gradient scaler; fp16 refused without a GPU
- ``checkpoint``    atomic checkpoint folders, ``latest``, pruning, the settings a resume must keep
- ``validation``    1-/2-step validation grids from the LoRA and its EMA
- ``cli``           flags shared by the training and precompute scripts; one-line argparse errors (exit 2)
- ``model_configs`` models' configs read without their weights (what the preflight checks)
- ``checks``        command-line validation that fails in one line before any model loads
- ``library_noise`` library notices that say nothing to a user, filtered by their exact text
- ``journeydb``     JourneyDB annotations -> clean prompt file, imagefolder metadata (a package: ``prepare_journeydb.py``)
- ``clip_bpe``      SD1.5's CLIP BPE tokenizer rebuilt offline from open_clip's merge list
- ``inference``     the four sampling modes, LoRA loading checks, the informative prior (IPI)
- ``model_card``    ``--output_dir/README.md`` in the Hub's model-card format
- ``hub``           which output files go to the Hub, under which names; the upload
- ``run``           one builder for a training run: settings (named like the flags) -> models, optimizers, step
- ``outputs``       the final save: LoRA(s), kohya copies, latent statistics, model card
- ``output_files``  the output files users take away, and their names on the Hub
- ``atomic``        files written whole or not at all (temp name, then rename)
- ``tracking``      scalars averaged over accumulation and processes for the trackers
- ``evaluation``    prompt sets, runs (LoRA x mode x steps), resumable sharded generation, reports
- ``image_metrics`` FID (TorchScript Inception + torchmetrics) and CLIP score, with their protocol
- ``output_dir``    output folders created only once there is something to write
- ``testing``       tiny SD1.5-/SD-Turbo-/SDXL-Turbo-shaped pipelines built offline for tests and the demo
"""

__version__ = "0.1.0"
