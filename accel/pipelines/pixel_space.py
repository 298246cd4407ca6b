"""Weight-free stand-ins for a VAE, so the reference models run in pixel space through unmodified diffusers
pipelines.

* ``PixelSpaceVAE`` (for ``DiTPipeline``): ``decode`` returns its input. The pipeline maps the model's [-1, 1]
  output to [0, 1] itself.
* ``FramePackingVAE`` (for ``WanPipeline``): Wan's pipeline assumes a causal video VAE that keeps the first frame
  and folds every following group of 4 frames into one latent frame (9 frames -> 3 latent frames, 33 -> 9).
  This "VAE" does exactly that, with no weights: latent frame 0 holds frame 0 in each of its 4 channel groups,
  latent frame j holds frames 4j-3 .. 4j stacked on the channel axis. ``encode`` and ``decode`` are exact
  inverses (decode averages the 4 copies of frame 0). Spatial size is unchanged.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, channels: int = 1, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("_dtype_anchor", torch.zeros(()), persistent=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        return DecoderOutput(sample=latents) if return_dict else (latents,)


class FramePackingVAE(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        channels: int = 1,
        scale_factor_temporal: int = 4,
        scale_factor_spatial: int = 1,
        z_dim: int = 4,
        latents_mean: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0),
        latents_std: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        if z_dim != channels * scale_factor_temporal or scale_factor_spatial != 1:
            raise ValueError("FramePackingVAE needs z_dim == channels * scale_factor_temporal and no spatial scaling.")
        self.register_buffer("_dtype_anchor", torch.zeros(()), persistent=False)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, C, 1 + 4k, H, W] in [0, 1] -> latents [B, 4C, 1 + k, H, W] in [-1, 1]."""
        group = self.config.scale_factor_temporal
        batch, channels, frames, height, width = video.shape
        if (frames - 1) % group:
            raise ValueError(f"FramePackingVAE needs 1 + {group}k frames, got {frames}.")
        video = video * 2 - 1
        first = video[:, :, :1].repeat(1, group, 1, 1, 1)
        rest = video[:, :, 1:].reshape(batch, channels, (frames - 1) // group, group, height, width)
        rest = rest.permute(0, 3, 1, 2, 4, 5).reshape(batch, group * channels, (frames - 1) // group, height, width)
        return torch.cat([first, rest], dim=2)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        """Latents [B, 4C, 1 + k, H, W] -> video [B, C, 1 + 4k, H, W] in [-1, 1] (the pipeline rescales)."""
        group, channels = self.config.scale_factor_temporal, self.config.channels
        batch, _, latent_frames, height, width = latents.shape
        first = latents[:, :, :1].reshape(batch, group, channels, 1, height, width).mean(dim=1)
        rest = latents[:, :, 1:].reshape(batch, group, channels, latent_frames - 1, height, width)
        rest = rest.permute(0, 2, 3, 1, 4, 5).reshape(batch, channels, (latent_frames - 1) * group, height, width)
        video = torch.cat([first, rest], dim=2)
        return DecoderOutput(sample=video) if return_dict else (video,)
