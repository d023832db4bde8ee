"""D(x, t, c): the base UNet's encoder half, initialised from the base weights and fully trained,
with a head that turns the mid-block feature map into one logit per sample (SPEC section 3).

    encoder half -> [B, C, h, w] -> GroupNorm(32, C) in fp32 -> SiLU -> attention pooling -> SiLU -> Linear(512, 1)

The attention pooling is CLIP-style: the spatial mean is prepended as a query token, a learned
positional embedding covers the h*w + 1 positions, and multi-head attention (16 channels per head)
reads the map into that token, projected to 512. ``h, w`` follow from the resolution.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from yoso.method.unet_encoder import UNetEncoder

HEAD_CHANNELS = 16
POOLED_DIM = 512


class AttentionPool2d(nn.Module):
    def __init__(self, spatial_size, channels, head_channels=HEAD_CHANNELS, output_dim=POOLED_DIM):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention pooling: {channels} channels do not split into heads of {head_channels}")
        self.spatial_size = spatial_size
        self.num_heads = channels // head_channels
        self.positional_embedding = nn.Parameter(torch.randn(spatial_size * spatial_size + 1, channels) / math.sqrt(channels))
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, output_dim)

    def forward(self, x):
        batch, channels, height, width = x.shape
        if height != self.spatial_size or width != self.spatial_size:
            raise ValueError(
                f"discriminator built for {self.spatial_size}x{self.spatial_size} features, got {height}x{width}: "
                "the training resolution and the discriminator's do not match"
            )
        tokens = x.flatten(2).transpose(1, 2)                                 # [B, hw, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # mean token first
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)

        def heads(t):
            return t.view(batch, -1, self.num_heads, channels // self.num_heads).transpose(1, 2)

        # Only the mean token's output is kept, so only it needs to query.
        pooled = F.scaled_dot_product_attention(heads(q[:, :1]), heads(k), heads(v))
        return self.proj(pooled.transpose(1, 2).reshape(batch, channels))


class Discriminator(nn.Module):
    def __init__(self, unet, resolution, vae_scale_factor=8, norm_groups=32):
        super().__init__()
        if getattr(unet, "peft_config", None):
            raise ValueError("build the discriminator from the base UNet before the LoRA is added to it")
        # A copy: D trains all of its encoder, and holds no decoder blocks (no memory, no unused DDP params).
        self.encoder = UNetEncoder(unet, copy_weights=True)
        self.encoder.requires_grad_(True)
        channels = self.encoder.out_channels
        self.feature_size = self.encoder.feature_size(resolution // vae_scale_factor)
        if self.feature_size < 1:
            raise ValueError(f"--resolution {resolution} is too small for this UNet's {self.encoder.num_downsamplings} downsamplings")
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.pool = AttentionPool2d(self.feature_size, channels)
        self.to_logit = nn.Linear(POOLED_DIM, 1)

    def forward(self, x, timestep, encoder_hidden_states):
        features = self.encoder(x, timestep, encoder_hidden_states)
        # GroupNorm statistics in fp32 whatever the autocast dtype: fp16 variance over 1280x8x8 overflows.
        with torch.autocast(device_type=features.device.type, enabled=False):
            hidden = F.silu(self.norm(features.float()))
        hidden = F.silu(self.pool(hidden))
        return self.to_logit(hidden).squeeze(-1).float()
