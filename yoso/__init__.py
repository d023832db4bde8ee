"""YOSO-LoRA: one- and two-step Stable Diffusion 1.5 via a self-cooperative diffusion GAN (arXiv 2403.12931).

One concept per module:

- ``schedule``      noise schedule, x0 from UNet output, LCM boundary scalings, loss weights
- ``unet_encoder``  the UNet's encoder half (feature net F, discriminator trunk), adapter/checkpointing switches
- ``discriminator`` D: encoder half + GroupNorm + attention pooling head
- ``losses``        consistency, data ("KL") and GAN losses
- ``ema``           in-place fp32 EMA of the LoRA
- ``lora``          LoRA config, targets, save/load in diffusers format
- ``data``          prompt files and the resumable, rank-sharded prompt sampler
- ``teacher``       teacher pipeline (SD-Turbo) that turns prompts into training latents
- ``latent_stats``  mean/std of the training latents for one-step IPI sampling: accumulated, saved, loaded
- ``latent_cache``  precomputed teacher latents (train without loading the teacher)
- ``models``        loading and placing every model of a run (shared by script, tests, benchmarks)
- ``step``          one YOSO training step (the D update, the G update, EMA)
- ``precision``     fp16 with two optimizers: D's own gradient scaler; fp16 refused without a GPU
- ``checkpoint``    atomic checkpoint folders, ``latest``, pruning
- ``validation``    1-/2-step validation grids from the LoRA and its EMA
- ``checks``        command-line validation that fails in one line before any model loads
- ``journeydb``     JourneyDB annotations -> clean prompt file (``prepare_journeydb.py``)
- ``inference``     the four sampling modes, LoRA loading checks, the informative prior (IPI)
- ``evaluation``    prompt sets, runs (LoRA x mode x steps), resumable sharded generation, reports
- ``image_metrics`` FID (TorchScript Inception + torchmetrics) and CLIP score, with their protocol
- ``output_dir``    output folders created only once there is something to write
- ``testing``       tiny SD1.5-/SD-Turbo-shaped pipelines built offline for tests and the demo
"""

__version__ = "0.1.0"
