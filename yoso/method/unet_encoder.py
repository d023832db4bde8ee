"""The encoder half of a diffusers UNet2DConditionModel: conv_in, time embedding, down blocks, mid block.

Two models are built on it (SPEC section 3):

- F, the latent perceptual feature net, is G's own encoder half run with the LoRA disabled. It shares
  G's modules, so no second frozen UNet is kept in memory.
- D's trunk is a deep copy of the base UNet's encoder half, trained.
"""

import copy
from contextlib import contextmanager

import torch
from torch import nn

from yoso.method.lora import AdaptersDisabled


class UNetEncoder(nn.Module):
    """Runs the first half of a UNet and returns the mid-block output ``[B, C_mid, h, w]``."""

    def __init__(self, unet, copy_weights=False):
        super().__init__()
        take = copy.deepcopy if copy_weights else (lambda module: module)
        self.conv_in = take(unet.conv_in)
        self.time_proj = take(unet.time_proj)
        self.time_embedding = take(unet.time_embedding)
        self.down_blocks = take(unet.down_blocks)
        self.mid_block = take(unet.mid_block)
        if getattr(unet, "class_embedding", None) is not None or getattr(unet, "add_embedding", None) is not None:
            raise ValueError("UNet encoder: class / added conditioning embeddings (SDXL-style UNets) are not supported")
        self.num_downsamplings = sum(block.downsamplers is not None for block in unet.down_blocks)
        self.out_channels = unet.config.block_out_channels[-1]

    def feature_size(self, latent_size):
        """Spatial size of the mid-block feature map for a latent of side ``latent_size``."""
        return latent_size // 2**self.num_downsamplings

    def forward(self, sample, timestep, encoder_hidden_states):
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.dim() == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(sample.shape[0])
        # time_proj returns fp32; the embedding MLP runs in the sample's dtype, as in the UNet itself.
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))
        hidden = self.conv_in(sample)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden, _ = block(hidden_states=hidden, temb=emb)
        return self.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)


@contextmanager
def gradient_checkpointing_disabled(module):
    """Temporarily run every block of ``module`` without gradient checkpointing.

    F runs G's blocks with the LoRA disabled; a checkpointed block would recompute its forward during
    backward, when the LoRA is enabled again, and torch raises CheckpointError (or, where shapes happen
    to match, the gradients are silently wrong). So F never checkpoints.
    """
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


class FeatureNet:
    """F(z): the base UNet's mid-block features of ``z`` at timestep 0 with text ``c``.

    Runs G's encoder half with the LoRA switched off and without checkpointing. Its weights are frozen
    (the base weights never require grad), so gradients reach the input only.
    """

    def __init__(self, unet):
        self.unet = unet
        self.encoder = UNetEncoder(unet)

    def __call__(self, latents, encoder_hidden_states):
        timestep = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
        with AdaptersDisabled(self.unet), gradient_checkpointing_disabled(self.unet):
            return self.encoder(latents, timestep, encoder_hidden_states)
