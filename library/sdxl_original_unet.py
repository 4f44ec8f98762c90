"""SDXL UNet in the original (Stability AI / SGM ``openaimodel.UNetModel``) layout.

Parameter names are kohya's ``sdxl_original_unet`` names, which are the
``model.diffusion_model.*`` keys of ``sd_xl_base_1.0.safetensors`` with that
prefix removed (``time_embed.0``, ``label_emb.0.0``, ``input_blocks.4.1.
transformer_blocks.0.attn1.to_q``, ``output_blocks.2.2.conv``, ``out.2`` ...),
so a checkpoint loads by name without a renaming table.

The topology is config-driven (``SdxlUNetConfig``); the default is SDXL base
(2,567,463,684 parameters). Tests use tiny configurations of the same shape.

Forward: ``unet(x, timesteps, context, y)`` as kohya/SGM: ``x`` (B,C,H,W)
latents, ``timesteps`` (B,) or a scalar, ``context`` (B,L,context_dim) text
hidden states, ``y`` (B,adm_in_channels) the "vector" conditioning (pooled
text embedding + sinusoidal size/crop embeddings, built outside the model;
see ``get_size_embeddings``). Returns the noise prediction (B,C,H,W).

Switches (set them before the first graph-mode call; a compiled graph does
not change afterwards):
- ``set_attention_impl("plain" | "chunked" | "flash", chunk_size)``, see
  ``library.attention``; kohya's ``set_use_memory_efficient_attention`` and
  ``set_use_sdpa`` map onto it.
- ``set_gradient_checkpointing(True)``: a flag the trainer reads to run the U-Net as
  segments with program-driven recompute (``library.unet_segments``).
- ``to_dtype(ms.float16)``: Linear/Conv weights to half precision, norms kept
  in fp32 (they compute their statistics in fp32 anyway).
"""
import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from library import layers
from library.attention import (DEFAULT_CHUNK_SIZE, ScaledDotProductAttention, attention_impl_for_flags,
                               check_attention_impl)

IN_CHANNELS = 4
OUT_CHANNELS = 4
ADM_IN_CHANNELS = 2816
CONTEXT_DIM = 2048
MODEL_CHANNELS = 320
TIME_EMBED_DIM = 320 * 4

# mindspore.lazy_inline on the repeated blocks' __init__ (compile each block once
# instead of inlining it 70x / 25x). Off: on CPU (MindSpore 2.10, jit_level O0/O1/O2)
# graph compilation then fails with "Input[0] must be a Primitive ValueNode, but
# get ValueNode<FuncGraph> ... ResBlock_construct" in the backend segment runner.
USE_LAZY_INLINE = False


def _maybe_lazy_inline(init):
    return ms.lazy_inline(init) if USE_LAZY_INLINE else init


@dataclasses.dataclass
class SdxlUNetConfig:
    """SGM UNetModel hyper-parameters that the SDXL layout uses (defaults: SDXL base 1.0)."""
    in_channels: int = IN_CHANNELS
    out_channels: int = OUT_CHANNELS
    model_channels: int = MODEL_CHANNELS
    channel_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: Sequence[int] = (0, 2, 10)  # per level; 0 = no attention at that level
    transformer_depth_middle: Optional[int] = None  # None: transformer_depth[-1]
    num_head_channels: int = 64
    context_dim: int = CONTEXT_DIM
    adm_in_channels: int = ADM_IN_CHANNELS
    norm_num_groups: int = 32

    @property
    def time_embed_dim(self):
        return self.model_channels * 4

    @property
    def depth_middle(self):
        return self.transformer_depth[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle


# ---------------------------------------------------------------------------
# timestep / size embeddings


def _frequencies(dim, max_period=10000, downscale_freq_shift=0.0):
    half = dim // 2
    exponent = np.arange(half, dtype=np.float32) * np.float32(-math.log(max_period))
    exponent = exponent / np.float32(half - downscale_freq_shift)
    return np.exp(exponent).astype(np.float32)


def get_timestep_embedding(timesteps, embedding_dim, downscale_freq_shift=0.0, max_period=10000):
    """Sinusoidal embedding [cos, sin] of a 1-D array (SGM ``timestep_embedding``, shift 0).

    numpy or Tensor in, same kind out; for use outside compiled graphs (e.g. the
    size embeddings of ``y``). The UNet itself uses ``TimestepEmbedding``.
    """
    is_tensor = isinstance(timesteps, Tensor)
    t = timesteps.asnumpy() if is_tensor else np.asarray(timesteps)
    assert t.ndim == 1, "timesteps should be a 1-D array"
    args = t.astype(np.float32)[:, None] * _frequencies(embedding_dim, max_period, downscale_freq_shift)[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return Tensor(emb) if is_tensor else emb


def get_size_embeddings(orig_size, crop_size, target_size, dim=256):
    """SDXL size conditioning (B,2) x3 -> (B, 6*dim): each scalar embedded with ``dim`` sinusoids.

    Order as SGM/kohya: original (h, w), crop top-left (top, left), target (h, w).
    The UNet's ``y`` is ``concat([pooled_text_embedding, get_size_embeddings(...)], -1)``.
    """
    parts = []
    for v in (orig_size, crop_size, target_size):
        v = np.asarray(v.asnumpy() if isinstance(v, Tensor) else v, np.float32)
        b = v.shape[0]
        parts.append(get_timestep_embedding(v.reshape(-1), dim).reshape(b, -1))
    return np.concatenate(parts, axis=-1)


class TimestepEmbedding(nn.Cell):
    """In-graph sinusoidal embedding of (B,) timesteps: [cos(t f), sin(t f)], f = 10000^(-i/half)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.freqs = Tensor(_frequencies(dim)[None, :])

    def construct(self, timesteps):
        args = timesteps.astype(ms.float32).reshape(-1, 1) * self.freqs
        emb = ops.concat((ops.cos(args), ops.sin(args)), -1)
        if self.dim % 2 == 1:
            emb = ops.pad(emb, (0, 1))
        return emb


# ---------------------------------------------------------------------------
# blocks. Every block of input_blocks / middle_block / output_blocks takes
# (x, emb, context) so that the containers can call them uniformly.


class TimestepEmbedSequential(nn.SequentialCell):
    """SequentialCell whose children get (x, emb, context); names stay ``N.0``, ``N.1``..."""

    def construct(self, x, emb, context):
        for cell in self.cell_list:
            x = cell(x, emb, context)
        return x


class InputConv(layers.Conv2d):
    """conv_in (``input_blocks.0.0``) with the block signature."""

    def construct(self, x, emb, context):
        return self.bias_add(self.conv(x, self.weight), self.bias.astype(x.dtype))


class ResBlock(nn.Cell):
    """SGM ResBlock: GroupNorm-SiLU-conv, + Linear(SiLU(emb)), GroupNorm-SiLU-(dropout)-conv, + skip."""

    @_maybe_lazy_inline
    def __init__(self, in_channels, out_channels, emb_channels, groups=32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.in_layers = nn.SequentialCell([
            layers.GroupNorm(groups, in_channels, eps=1e-5),
            layers.SiLU(),
            layers.Conv2d(in_channels, out_channels, 3, padding=1),
        ])
        self.emb_layers = nn.SequentialCell([layers.SiLU(), layers.Linear(emb_channels, out_channels)])
        self.out_layers = nn.SequentialCell([
            layers.GroupNorm(groups, out_channels, eps=1e-5),
            layers.SiLU(),
            layers.Identity(),  # dropout slot (index kept for the checkpoint names)
            layers.Conv2d(out_channels, out_channels, 3, padding=1),
        ])
        if in_channels != out_channels:
            self.skip_connection = layers.Conv2d(in_channels, out_channels, 1)
        else:
            self.skip_connection = layers.Identity()

    def construct(self, x, emb, context):
        h = self.in_layers(x)
        e = self.emb_layers(emb).astype(h.dtype)
        # explicit broadcast: the CPU graph backend does not reuse memory of implicit broadcasts
        h = h + ops.broadcast_to(e.reshape(e.shape[0], e.shape[1], 1, 1), h.shape)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Cell):
    """3x3 conv, stride 2 (``op``)."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.op = layers.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def construct(self, x, emb, context):
        return self.op(x)


class Upsample(nn.Cell):
    """Nearest-neighbour x2 then 3x3 conv (``conv``)."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = layers.Conv2d(channels, out_channels or channels, 3, padding=1)

    def construct(self, x, emb, context):
        return self.conv(layers.upsample_nearest2x(x))


class CrossAttention(nn.Cell):
    """to_q/to_k/to_v (no bias) -> scaled dot-product attention -> to_out.0 (bias)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = layers.Linear(query_dim, inner, bias=False)
        self.to_k = layers.Linear(context_dim, inner, bias=False)
        self.to_v = layers.Linear(context_dim, inner, bias=False)
        self.to_out = nn.CellList([layers.Linear(inner, query_dim)])
        self.attention = ScaledDotProductAttention(heads)

    def construct(self, x, context):
        q = self.to_q(x)
        k = self.to_k(context)
        v = self.to_v(context)
        return self.to_out[0](self.attention(q, k, v))


class GEGLU(nn.Cell):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = layers.Linear(dim_in, dim_out * 2)
        self.gelu = layers.GELU()

    def construct(self, x):
        h, gate = ops.chunk(self.proj(x), 2, -1)
        return h * self.gelu(gate)


class FeedForward(nn.Cell):
    def __init__(self, dim, mult=4):
        super().__init__()
        inner = dim * mult
        self.net = nn.SequentialCell([GEGLU(dim, inner), layers.Identity(), layers.Linear(inner, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    """x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x)."""

    @_maybe_lazy_inline
    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = layers.LayerNorm(dim)
        self.norm2 = layers.LayerNorm(dim)
        self.norm3 = layers.LayerNorm(dim)

    def construct(self, x, context):
        h = self.norm1(x)
        x = self.attn1(h, h) + x
        x = self.attn2(self.norm2(x), context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Cell):
    """GroupNorm(eps 1e-6) -> Linear proj_in -> transformer blocks -> Linear proj_out, + residual."""

    def __init__(self, channels, heads, dim_head, depth, context_dim, groups=32):
        super().__init__()
        inner = heads * dim_head
        self.norm = layers.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = layers.Linear(channels, inner)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = layers.Linear(inner, channels)

    def construct(self, x, emb, context):
        h = transformer_entry(self.norm, self.proj_in, x)
        for block in self.transformer_blocks:
            h = block(h, context)
        return transformer_exit(self.proj_out, h, x)


def transformer_entry(norm, proj_in, x):
    """A SpatialTransformer's input: GroupNorm, (B,C,H,W) -> (B,H*W,C) tokens, proj_in."""
    b, c, hh, ww = x.shape
    return proj_in(norm(x).transpose(0, 2, 3, 1).reshape(b, hh * ww, c))


def transformer_exit(proj_out, h, x):
    """A SpatialTransformer's output: proj_out, tokens back to x's (B,C,H,W), plus the residual x."""
    b, c, hh, ww = x.shape
    return proj_out(h).reshape(b, hh, ww, c).transpose(0, 3, 1, 2) + x


def unet_embedding(time_proj, time_embed, label_emb, x, timesteps, context, y):
    """(emb, context in x's dtype): the time + label ("vector") embedding every ResBlock adds."""
    timesteps = ops.broadcast_to(timesteps.reshape(-1), (x.shape[0],))
    t_emb = time_proj(timesteps).astype(x.dtype)
    return time_embed(t_emb) + label_emb(y.astype(x.dtype)), context.astype(x.dtype)


# ---------------------------------------------------------------------------


class SdxlUNet2DConditionModel(nn.Cell):
    """The SDXL UNet (SGM layout, kohya names). ``construct(x, timesteps, context, y)``."""

    def __init__(self, config: Optional[SdxlUNetConfig] = None, **kwargs):
        super().__init__()
        if config is None:
            config = SdxlUNetConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        c = config
        if len(c.transformer_depth) != len(c.channel_mult):
            raise ValueError("transformer_depth needs one entry per channel_mult level")
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.model_channels = c.model_channels
        self.time_embed_dim = ted = c.time_embed_dim
        self.adm_in_channels = c.adm_in_channels
        groups = c.norm_num_groups

        def transformer(ch, depth):
            return SpatialTransformer(ch, ch // c.num_head_channels, c.num_head_channels, depth,
                                      c.context_dim, groups)

        self.time_proj = TimestepEmbedding(c.model_channels)
        self.time_embed = nn.SequentialCell([
            layers.Linear(c.model_channels, ted), layers.SiLU(), layers.Linear(ted, ted)])
        self.label_emb = nn.SequentialCell([nn.SequentialCell([
            layers.Linear(c.adm_in_channels, ted), layers.SiLU(), layers.Linear(ted, ted)])])

        input_blocks = [TimestepEmbedSequential([InputConv(c.in_channels, c.model_channels, 3, padding=1)])]
        skip_channels = [c.model_channels]
        ch = c.model_channels
        levels = len(c.channel_mult)
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                out_ch = mult * c.model_channels
                block = [ResBlock(ch, out_ch, ted, groups)]
                ch = out_ch
                if c.transformer_depth[level] > 0:
                    block.append(transformer(ch, c.transformer_depth[level]))
                input_blocks.append(TimestepEmbedSequential(block))
                skip_channels.append(ch)
            if level != levels - 1:
                input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
        self.input_blocks = nn.CellList(input_blocks)

        middle = [ResBlock(ch, ch, ted, groups)]
        if c.depth_middle > 0:
            middle.append(transformer(ch, c.depth_middle))
        middle.append(ResBlock(ch, ch, ted, groups))
        self.middle_block = TimestepEmbedSequential(middle)

        output_blocks = []
        for level in reversed(range(levels)):
            mult = c.channel_mult[level]
            for i in range(c.num_res_blocks + 1):
                out_ch = mult * c.model_channels
                block = [ResBlock(ch + skip_channels.pop(), out_ch, ted, groups)]
                ch = out_ch
                if c.transformer_depth[level] > 0:
                    block.append(transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks:
                    block.append(Upsample(ch))
                output_blocks.append(TimestepEmbedSequential(block))
        self.output_blocks = nn.CellList(output_blocks)

        self.out = nn.SequentialCell([
            layers.GroupNorm(groups, ch, eps=1e-5), layers.SiLU(),
            layers.Conv2d(ch, c.out_channels, 3, padding=1)])
        self.gradient_checkpointing = False
        self.attention_impl = "plain"

    # -- switches -----------------------------------------------------------

    def _cells_of(self, kind):
        return [cell for _, cell in self.cells_and_names() if isinstance(cell, kind)]

    def set_attention_impl(self, impl: str, chunk_size: Optional[int] = None):
        """'plain', 'chunked' (query blocks of ``chunk_size``) or 'flash' (Ascend only)."""
        check_attention_impl(impl)
        for cell in self._cells_of(ScaledDotProductAttention):
            cell.set_impl(impl, chunk_size)
        self.attention_impl = impl

    def set_use_memory_efficient_attention(self, xformers: bool, mem_eff: bool):
        """kohya's switch, mapped by ``library.attention.KOHYA_ATTENTION_FLAGS``."""
        impl = attention_impl_for_flags({"mem_eff_attn": mem_eff, "xformers": xformers},
                                        ms.get_context("device_target"))
        self.set_attention_impl(impl or "plain", DEFAULT_CHUNK_SIZE)

    def set_use_sdpa(self, sdpa: bool):
        """kohya's switch, mapped by ``library.attention.KOHYA_ATTENTION_FLAGS``."""
        self.set_attention_impl(attention_impl_for_flags({"sdpa": sdpa}, ms.get_context("device_target")) or "plain")

    def set_gradient_checkpointing(self, value: bool = False):
        """Mark the U-Net as trained with gradient checkpointing.

        The checkpointing is done by the program, not by the backend: the trainer then runs the U-Net
        as a chain of compiled segments (``library.unet_segments``) whose backward recomputes one layer
        at a time, which bounds the memory whatever the backend keeps inside a graph. ``construct``
        (one graph) is unchanged. MindSpore's ``Cell.recompute()`` is not used: in PyNative mode it
        left the parameters inside the recomputed cells without gradient (the LoRA modules of the
        feed-forwards), and on the CPU graph backend it did not lower the peak.
        """
        self.gradient_checkpointing = bool(value)

    def to_dtype(self, dtype, compute_dtype=None):
        """Cast Linear/Conv parameters to ``dtype`` (norm parameters stay fp32); returns self.

        ``compute_dtype`` (default: ``dtype``) is the dtype callers feed the U-Net (``compute_dtype``):
        fp16 weights with fp32 compute halve the weights' memory, each layer casting its weight to the
        input's dtype (``layers.StoredDense``, ``layers.Conv2dStride1``)."""
        for cell in self._cells_of((layers.Linear, layers.Conv2d)):
            for p in cell.get_parameters(expand=False):
                if p.dtype != dtype:
                    p.set_dtype(dtype)
        self._compute_dtype = compute_dtype
        return self

    @property
    def dtype(self):
        return self.time_embed[0].weight.dtype

    @property
    def compute_dtype(self):
        return getattr(self, "_compute_dtype", None) or self.dtype

    # -- forward ------------------------------------------------------------

    def construct(self, x, timesteps, context, y):
        emb, context = unet_embedding(self.time_proj, self.time_embed, self.label_emb, x, timesteps, context, y)

        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        i = len(hs) - 1
        for block in self.output_blocks:
            h = ops.concat((h, hs[i]), 1)
            h = block(h, emb, context)
            i = i - 1
        return self.out(h.astype(x.dtype))
