"""YOSO-LoRA: one- and two-step Stable Diffusion 1.5 via a self-cooperative diffusion GAN (arXiv 2403.12931).

The subpackages are the layers of a run, lowest first; a module imports its own layer and earlier ones only
(tests/test_layout.py checks it):

- ``utils``       files written whole or not at all, library notices, models' configs read without weights,
                  precision (frozen weights' dtype, D's own fp16 gradient scaler, shared autocast casts)
- ``data``        where training latents come from: prompt files and the sharded sampler, the teacher (SD-Turbo),
                  real image-caption data (folders, Hub datasets, tar shards), latent spaces, the teacher-latent
                  cache, latent statistics, JourneyDB preparation, the CLIP BPE tables
- ``method``      the YOSO training step and its parts: schedule, losses, UNet encoder (F), discriminator (D),
                  LoRA, EMA, training-health signals
- ``outputs``     what a run leaves behind: the final save, kohya copies, model card, Hub upload, output folders
- ``evaluation``  sampling (the four inference modes, IPI), FID / CLIP score, evaluation runs
- ``training``    the run around the step: flags and checks, model loading, the run builder, checkpoints,
                  validation grids, tracking, interrupts and full disks
- ``testing``     tiny SD1.5-/SD-Turbo-/SDXL-Turbo-shaped pipelines built offline for tests and the demo
"""

__version__ = "0.1.0"
