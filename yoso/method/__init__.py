"""The method: one YOSO training step and its parts (SPEC.md).

- ``schedule``       noise schedule, x0 from the UNet output, LCM boundary scalings, loss weights
- ``losses``         consistency, data ("KL") and GAN losses
- ``unet_encoder``   the UNet's encoder half (feature net F, discriminator trunk)
- ``discriminator``  D: encoder half + GroupNorm + attention pooling head
- ``lora``           LoRA config, targets, save/load in diffusers format
- ``ema``            in-place fp32 EMA of the LoRA (and its warm-up)
- ``health``         training-health signals (D's accuracy, gradient norms, EMA distance) and their warnings
- ``step``           one training step: D's update, G's update, EMA; non-finite skips
"""
