"""The digits experiment: YOSO-LoRA on a small latent diffusion model trained on real handwritten digits."""
