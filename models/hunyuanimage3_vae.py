"""HunyuanImage-3.0's 3-D convolutional VAE decoder (``AutoencoderKLConv3D`` of the release), decode path only.

diffusers 0.42.1 has no matching class: ``AutoencoderKLHunyuanVideo15`` is the closest, but it uses RMS norms and
causal convolutions with other key names and shapes; ``AutoencoderKLHunyuanImage`` (HunyuanImage-2.1) is 2-D. The
architecture below follows the reference implementation ``hunyuan_image_3/autoencoder_kl_3d.py``
(Tencent-Hunyuan/HunyuanImage-3.0; itself after FLUX's autoencoder and MIT-Han-Lab's DC-AE up-sampler) and is written
in the style of diffusers' autoencoders. Its parameter names are the checkpoint's ``vae.decoder.*`` names without
the ``vae.`` prefix; the encoder (``vae.encoder.*``) is not needed for text-to-image and is not built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["AutoencoderKLHunyuanImage3"]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class HunyuanImage3VAEResnetBlock(nn.Module):
    """GroupNorm(32, eps 1e-6) -> SiLU -> Conv3d 3x3x3, twice, plus a (1x1x1-conv when the width changes) skip."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class HunyuanImage3VAEAttnBlock(nn.Module):
    """Single-head self-attention over all ``T*H*W`` positions with 1x1x1-conv projections and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv3d(channels, channels, kernel_size=1)
        self.k = nn.Conv3d(channels, channels, kernel_size=1)
        self.v = nn.Conv3d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv3d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, f, height, width = x.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:  # b c f h w -> b 1 (f h w) c
            return t.reshape(b, c, f * height * width).transpose(1, 2).unsqueeze(1).contiguous()

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, f, height, width)
        return x + self.proj_out(out)


class HunyuanImage3VAEUpsample(nn.Module):
    """DC-AE style up-sampler: conv to ``out * r_t * 2 * 2`` channels, pixel-shuffle ``(r_t, 2, 2)``, plus the input
    repeated along channels and shuffled the same way (parameter-free shortcut). ``r_t = 2`` when time is
    up-sampled, else 1."""

    def __init__(self, in_channels: int, out_channels: int, add_temporal_upsample: bool):
        super().__init__()
        self.temporal = 2 if add_temporal_upsample else 1
        factor = self.temporal * 2 * 2
        self.conv = nn.Conv3d(in_channels, out_channels * factor, kernel_size=3, stride=1, padding=1)
        self.repeats = factor * out_channels // in_channels

    def _shuffle(self, x: torch.Tensor) -> torch.Tensor:
        # b (r1 r2 r3 c) f h w -> b c (f r1) (h r2) (w r3)
        b, channels, f, h, w = x.shape
        r1 = self.temporal
        c = channels // (r1 * 4)
        x = x.reshape(b, r1, 2, 2, c, f, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        return x.reshape(b, c, f * r1, h * 2, w * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._shuffle(self.conv(x))
        shortcut = self._shuffle(x.repeat_interleave(repeats=self.repeats, dim=1))
        return h + shortcut


class HunyuanImage3VAEDecoder(nn.Module):
    """``conv_in(z) + z`` repeated to the first width -> mid (Res, Attn, Res) -> per level ``layers_per_block + 1``
    ResnetBlocks and an up-sampler (spatial on the first ``log2(ffactor_spatial)`` levels, temporal on the first
    ``log2(ffactor_temporal)``) -> GroupNorm -> SiLU -> ``conv_out``."""

    def __init__(
        self,
        z_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        num_res_blocks: int,
        ffactor_spatial: int,
        ffactor_temporal: int,
        upsample_match_channel: bool = True,
    ):
        super().__init__()
        if block_out_channels[0] % z_channels:
            raise ValueError(
                f"block_out_channels[-1] (the decoder's first width, {block_out_channels[0]}) must be a multiple of "
                f"latent_channels ({z_channels})"
            )
        self.z_channels = z_channels
        self.block_out_channels = tuple(block_out_channels)
        self.num_res_blocks = num_res_blocks
        block_in = block_out_channels[0]
        self.conv_in = nn.Conv3d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = HunyuanImage3VAEResnetBlock(block_in, block_in)
        self.mid.attn_1 = HunyuanImage3VAEAttnBlock(block_in)
        self.mid.block_2 = HunyuanImage3VAEResnetBlock(block_in, block_in)
        self.up = nn.ModuleList()
        for level, channels in enumerate(block_out_channels):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(HunyuanImage3VAEResnetBlock(block_in, channels))
                block_in = channels
            spatial = level < math.log2(ffactor_spatial)
            temporal = level < math.log2(ffactor_temporal)
            if spatial or temporal:
                if level >= len(block_out_channels) - 1:
                    raise ValueError("ffactor_spatial needs fewer up-sampling levels than len(block_out_channels)")
                block_out = block_out_channels[level + 1] if upsample_match_channel else block_in
                up.upsample = HunyuanImage3VAEUpsample(block_in, block_out, temporal)
                block_in = block_out
            self.up.append(up)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv3d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        repeats = self.block_out_channels[0] // self.z_channels
        h = self.conv_in(z) + z.repeat_interleave(repeats=repeats, dim=1)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in self.up:
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKLHunyuanImage3(ModelMixin, ConfigMixin):
    r"""The decoder of HunyuanImage-3.0's 3-D convolutional VAE (32 latent channels, 16x spatial, 4x temporal).

    Config fields are those of the ``vae`` dict in the release's ``config.json``. A latent image
    ``(B, latent_channels, 1, H/16, W/16)`` decodes to ``log2(ffactor_temporal)`` temporal up-samplings worth of
    frames (4 for the release); for a single-frame latent the **last** frame is kept, as the reference
    ``AutoencoderKLConv3D.decode`` does. The caller divides latents by ``scaling_factor`` (and adds
    ``shift_factor`` when set) before :meth:`decode`. The reference's tiled and distributed decoding (for outputs
    larger than ``sample_size``) is not implemented: the whole latent is decoded at once.

    Load it from the release directory with
    ``CachedHunyuanImage3Pipeline.from_pretrained`` or :meth:`from_official_checkpoint`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 32,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 1024, 1024),
        layers_per_block: int = 2,
        ffactor_spatial: int = 16,
        ffactor_temporal: int = 4,
        sample_size: int = 384,
        sample_tsize: int = 96,
        scaling_factor: float = 0.562679178327931,
        shift_factor: float | None = None,
        downsample_match_channel: bool = True,
        upsample_match_channel: bool = True,
    ):
        super().__init__()
        self.decoder = HunyuanImage3VAEDecoder(
            z_channels=latent_channels,
            out_channels=out_channels,
            block_out_channels=tuple(reversed(block_out_channels)),
            num_res_blocks=layers_per_block,
            ffactor_spatial=ffactor_spatial,
            ffactor_temporal=ffactor_temporal,
            upsample_match_channel=upsample_match_channel,
        )

    def decode(self, z: torch.Tensor, return_dict: bool = True, return_all_frames: bool = False):
        """Decode scaled latents.

        Args:
            z: ``(B, latent_channels, T, h, w)`` (already divided by ``scaling_factor``).
            return_all_frames: keep every decoded frame even for ``T == 1`` (for parity checks).

        Returns:
            ``DecoderOutput(sample)`` with ``sample`` ``(B, out_channels, T', 16 h, 16 w)``, nominally in [-1, 1];
            ``T' = 1`` for a single-frame latent unless ``return_all_frames``.

        Raises:
            ValueError: if ``z`` is not 5-D with ``latent_channels`` channels.
        """
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"z must have shape (B, {self.config.latent_channels}, T, h, w), got {tuple(z.shape)}"
            )
        decoded = self.decoder(z.to(self.dtype))
        if z.shape[2] == 1 and not return_all_frames:
            decoded = decoded[:, :, -1:]
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    def forward(self, z: torch.Tensor, return_dict: bool = True):
        """Same as :meth:`decode` (the encoder is not built)."""
        return self.decode(z, return_dict=return_dict)

    @classmethod
    def from_official_checkpoint(
        cls,
        directory,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        output_loading_info: bool = False,
        torch_dtype: torch.dtype | str | None = None,
    ):
        """Build from the release's ``config.json`` (its ``vae`` dict) and load ``vae.decoder.*`` shard by shard.

        ``vae.encoder.*`` and every non-VAE key are skipped (listed in the loading info). Raises ``ValueError`` for
        missing, unexpected or mis-shaped decoder keys. ``dtype`` defaults to the checkpoint's
        ``torch_dtype`` field; ``torch_dtype`` is its deprecated name (warns, as diffusers 0.42 does).
        """
        from cached_diffusers.models.hunyuanimage3 import load_official_component

        return load_official_component(
            cls, directory, component="vae", dtype=dtype, device=device,
            output_loading_info=output_loading_info, torch_dtype=torch_dtype,
        )
