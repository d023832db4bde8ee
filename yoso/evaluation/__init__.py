"""Sampling a trained LoRA and measuring it.

- ``inference``  the four sampling modes, LoRA loading checks, the informative prior (IPI)
- ``metrics``    FID (TorchScript Inception + torchmetrics) and CLIP score, with their protocol
- ``runs``       prompt sets, runs (LoRA x mode x steps), resumable sharded generation, reports
"""
