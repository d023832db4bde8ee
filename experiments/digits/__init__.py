"""The digits experiment (issue #6): YOSO-LoRA on a small latent diffusion model trained on real handwritten digits."""
