"""SDXL's VAE (diffusers ``AutoencoderKL``) in MindSpore, CPU- and Ascend-capable.

Parameter names are diffusers' (``encoder.down_blocks.0.resnets.0.conv1.weight``,
``encoder.mid_block.attentions.0.to_q.weight``, ``decoder.up_blocks.0.upsamplers.0.conv.weight``,
``quant_conv.weight``, ...), so a diffusers-format VAE state dict loads with
``library.layers.load_param_dict`` without renaming.

Semantics follow diffusers' ``AutoencoderKL`` with ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` blocks, a mid block of resnet / single-head attention /
resnet, GroupNorm eps 1e-6 and SiLU everywhere:

* ``encode(x)`` returns ``(mean, logvar)`` of the diagonal Gaussian posterior,
  ``logvar`` clamped to [-30, 20] as ``DiagonalGaussianDistribution`` does;
* ``sample_latents(mean, logvar, noise)`` is ``mean + exp(logvar / 2) * noise``
  (``DiagonalGaussian`` wraps the same with generated noise and the KL term);
* ``decode(z)`` maps (unscaled) latents to images in about [-1, 1].

Latents fed to the UNet are ``sample * SCALING_FACTOR`` (kohya: ``VAE_SCALE_FACTOR``).

``VAEEncode`` and ``VAEDecode`` wrap one model's encode and decode as separate
cells (no parameter renaming), so each can be compiled on its own in graph mode
(e.g. the trainer caches latents with the encoder only, inference decodes only).

The mid-block attention is one head over all H*W positions; for a 1024x1024
image that is 16384 tokens, a 1 GiB fp32 score matrix. Queries are processed in
chunks of ``attn_chunk_size`` tokens when there are more than that, which bounds
the score matrix to ``chunk * H * W`` elements with identical results.
"""
import dataclasses
import math
from typing import Tuple

import numpy as np

import library  # noqa: F401  (sets ONEDNN_MAX_CPU_ISA before mindspore loads)
import mindspore as ms
from mindspore import Tensor, nn, ops

from library.layers import Conv2d, GroupNorm, Linear, SiLU, upsample_nearest2x

SCALING_FACTOR = 0.13025
VAE_SCALE_FACTOR = SCALING_FACTOR  # kohya's sdxl_model_util name

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


@dataclasses.dataclass
class AutoencoderKLConfig:
    """diffusers ``AutoencoderKL`` config fields that shape the model (SDXL defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = SCALING_FACTOR
    # query tokens per attention chunk in the mid blocks; 0 disables chunking
    attn_chunk_size: int = 4096

    @classmethod
    def sdxl(cls, **overrides):
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides):
        """Same topology as SDXL's VAE (downsample/upsample, mid attention), small widths."""
        values = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
        values.update(overrides)
        return cls(**values)

    def diffusers_kwargs(self):
        """Keyword arguments that build the same model with ``diffusers.AutoencoderKL``."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            scaling_factor=self.scaling_factor,
        )


SDXL_VAE_CONFIG = AutoencoderKLConfig()


class ResnetBlock2D(nn.Cell):
    """GroupNorm-SiLU-Conv3x3 twice plus a (1x1 conv when widths differ) shortcut."""

    def __init__(self, in_channels, out_channels, groups, eps=1e-6):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = SiLU()
        self.has_shortcut = in_channels != out_channels
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if self.has_shortcut else None

    def construct(self, x):
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.has_shortcut:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Cell):
    """Zero pad right and bottom by one, then 3x3 conv stride 2 (diffusers' padding=0 variant)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)
        self.pad = ops.Pad(((0, 0), (0, 0), (0, 1), (0, 1)))

    def construct(self, x):
        return self.conv(self.pad(x))


class Upsample2D(nn.Cell):
    """Nearest-neighbour x2 upsampling, then 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        return self.conv(upsample_nearest2x(x))


class VAEAttention(nn.Cell):
    """Single-head self-attention over spatial positions with residual (diffusers ``Attention``
    as built by ``UNetMidBlock2D`` for the VAE): names group_norm, to_q, to_k, to_v, to_out.0."""

    def __init__(self, channels, groups, eps=1e-6, chunk_size=0):
        super().__init__()
        self.channels = channels
        self.scale = 1.0 / math.sqrt(channels)
        self.chunk_size = int(chunk_size)
        self.group_norm = GroupNorm(groups, channels, eps=eps)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.CellList([Linear(channels, channels)])
        self.bmm_qk = ops.BatchMatMul(transpose_b=True)
        self.bmm_pv = ops.BatchMatMul()

    def _attend(self, q, k, v):
        scores = self.bmm_qk(q, k)
        # softmax in fp32 (diffusers builds this attention with upcast_softmax=True)
        probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(v.dtype)
        return self.bmm_pv(probs, v)

    def construct(self, x):
        b, c, h, w = x.shape
        n = h * w
        t = self.group_norm(x).reshape(b, c, n).transpose(0, 2, 1)
        q = self.to_q(t) * self.scale
        k = self.to_k(t)
        v = self.to_v(t)
        chunk = self.chunk_size
        if chunk > 0 and n > chunk:
            outs = []
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                outs.append(self._attend(q[:, start:stop], k, v))
            o = ops.cat(outs, axis=1)
        else:
            o = self._attend(q, k, v)
        o = self.to_out[0](o)
        o = o.transpose(0, 2, 1).reshape(b, c, h, w)
        return o + x


class UNetMidBlock2D(nn.Cell):
    """resnet, attention, resnet at constant width."""

    def __init__(self, channels, groups, eps=1e-6, chunk_size=0):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups, eps),
                                    ResnetBlock2D(channels, channels, groups, eps)])
        self.attentions = nn.CellList([VAEAttention(channels, groups, eps, chunk_size)])

    def construct(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)])
        self.add_downsample = add_downsample
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_downsample:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)])
        self.add_upsample = add_upsample
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_upsample:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Cell):
    """Image (B, in, H, W) -> moments (B, 2*latent, H/2^(n-1), W/2^(n-1))."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        chans = tuple(config.block_out_channels)
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, chans[0], 3, padding=1)
        blocks = []
        prev = chans[0]
        for i, ch in enumerate(chans):
            blocks.append(DownEncoderBlock2D(prev, ch, config.layers_per_block, groups,
                                             add_downsample=i < len(chans) - 1))
            prev = ch
        self.down_blocks = nn.CellList(blocks)
        self.mid_block = UNetMidBlock2D(chans[-1], groups, chunk_size=config.attn_chunk_size)
        self.conv_norm_out = GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_act = SiLU()
        self.conv_out = Conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1)

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Cell):
    """Latent (B, latent, h, w) -> image (B, out, h*2^(n-1), w*2^(n-1))."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        chans = tuple(config.block_out_channels)
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, chans[-1], 3, padding=1)
        self.mid_block = UNetMidBlock2D(chans[-1], groups, chunk_size=config.attn_chunk_size)
        rev = tuple(reversed(chans))
        blocks = []
        prev = rev[0]
        for i, ch in enumerate(rev):
            blocks.append(UpDecoderBlock2D(prev, ch, config.layers_per_block + 1, groups,
                                           add_upsample=i < len(rev) - 1))
            prev = ch
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(groups, chans[0], eps=1e-6)
        self.conv_act = SiLU()
        self.conv_out = Conv2d(chans[0], config.out_channels, 3, padding=1)

    def construct(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


def posterior(moments, latent_channels):
    """The encoder's moments -> (mean, logvar of the diagonal Gaussian), logvar clamped to [-30, 20]."""
    return moments[:, :latent_channels], ops.clamp(moments[:, latent_channels:], LOGVAR_MIN, LOGVAR_MAX)


def sample_latents(mean, logvar, noise):
    """Posterior sample ``mean + exp(logvar / 2) * noise`` (unscaled latents)."""
    return mean + ops.exp(0.5 * logvar) * noise


class AutoencoderKL(nn.Cell):
    """diffusers-compatible KL autoencoder. ``construct(x)`` reconstructs from the posterior mean."""

    def __init__(self, config: AutoencoderKLConfig = None):
        super().__init__()
        self.config = config if config is not None else AutoencoderKLConfig()
        lc = self.config.latent_channels
        self.latent_channels = lc
        self.scaling_factor = self.config.scaling_factor
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = Conv2d(2 * lc, 2 * lc, 1)
        self.post_quant_conv = Conv2d(lc, lc, 1)

    def encode(self, x):
        """Image in [-1, 1] -> (mean, logvar), logvar clamped to [-30, 20]."""
        return posterior(self.quant_conv(self.encoder(x)), self.latent_channels)

    def decode(self, z):
        """Unscaled latents -> image."""
        return self.decoder(self.post_quant_conv(z))

    def construct(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


class VAEEncode(nn.Cell):
    """``vae.encode`` as its own cell (graph-compilable alone); returns (mean, logvar)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.vae = vae

    def construct(self, x):
        return self.vae.encode(x)


class VAEDecode(nn.Cell):
    """``vae.decode`` as its own cell (graph-compilable alone)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__(auto_prefix=False)
        self.vae = vae

    def construct(self, z):
        return self.vae.decode(z)


class DiagonalGaussian:
    """Posterior helper like diffusers' ``DiagonalGaussianDistribution`` (eager code)."""

    def __init__(self, mean, logvar, seed=None):
        self.mean = mean
        self.logvar = ops.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = ops.exp(0.5 * self.logvar)
        self._rng = np.random.default_rng(seed)

    def sample(self, noise=None):
        if noise is None:
            noise = Tensor(self._rng.standard_normal(self.mean.shape).astype(np.float32)).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL to N(0, I), summed over C, H, W (one value per batch item)."""
        return 0.5 * (ops.square(self.mean) + ops.exp(self.logvar) - 1.0 - self.logvar).sum(axis=(1, 2, 3))


def create_vae(config: AutoencoderKLConfig = None, init=True):
    """Build the VAE; ``init=False`` allocates zeros quickly (weights loaded afterwards)."""
    from library.layers import skip_init

    if init:
        return AutoencoderKL(config)
    with skip_init():
        return AutoencoderKL(config)
