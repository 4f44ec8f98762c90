"""The SDXL U-Net (``SdxlUNet2DConditionModel``) as segments of a ``library.segments.SegmentChain``.

One segment per layer of each block: a ResBlock (in the output blocks with the skip connection's
concat), a spatial transformer's entry (GroupNorm, tokens, proj_in), each transformer block, its
exit (proj_out, back to an image, residual), a down/upsampler; plus the time/label embedding
("stem") and the output head. The forward keeps these boundaries and the skip connections; the
backward recomputes one layer at a time. All transformer blocks of one width (SDXL: 10 at 640, 60 at
1280 channels), and equal ResBlocks, share one compiled graph (``SegmentChain``'s shared graphs).
The segments wrap the model's own cells (same parameters, nothing copied); the model's
``construct`` computes the same function in one graph.

Names: ``x``, ``timesteps``, ``context``, ``y`` in; ``pred`` out; inner names start with ``prefix``.
"""
from mindspore import nn, ops

from library import layers
from library import sdxl_original_unet as U
from library.segments import Segment


class _Stem(nn.Cell):
    def __init__(self, unet):
        super().__init__(auto_prefix=False)
        self.time_proj = unet.time_proj
        self.time_embed = unet.time_embed
        self.label_emb = unet.label_emb

    def construct(self, x, timesteps, context, y):
        return U.unet_embedding(self.time_proj, self.time_embed, self.label_emb, x, timesteps, context, y)


class _Layer(nn.Cell):
    """A block-signature layer that uses only ``h`` (conv_in, down/upsamplers)."""

    def __init__(self, layer):
        super().__init__(auto_prefix=False)
        self.layer = layer

    def construct(self, h):
        return self.layer(h, None, None)


class _Res(nn.Cell):
    def __init__(self, res):
        super().__init__(auto_prefix=False)
        self.res = res

    def construct(self, h, emb):
        return self.res(h, emb, None)


class _SkipRes(nn.Cell):
    def __init__(self, res):
        super().__init__(auto_prefix=False)
        self.res = res

    def construct(self, h, skip, emb):
        return self.res(ops.concat((h, skip), 1), emb, None)


class _TransformerIn(nn.Cell):
    def __init__(self, st):
        super().__init__(auto_prefix=False)
        self.norm = st.norm
        self.proj_in = st.proj_in

    def construct(self, h):
        return U.transformer_entry(self.norm, self.proj_in, h)


class _TransformerBlock(nn.Cell):
    def __init__(self, block):
        super().__init__(auto_prefix=False)
        self.block = block

    def construct(self, t, ctx):
        return self.block(t, ctx)


class _TransformerOut(nn.Cell):
    def __init__(self, st):
        super().__init__(auto_prefix=False)
        self.proj_out = st.proj_out

    def construct(self, t, h):
        return U.transformer_exit(self.proj_out, t, h)


class _Head(nn.Cell):
    def __init__(self, out):
        super().__init__(auto_prefix=False)
        self.out = out

    def construct(self, h):
        return self.out(h)


def _block_segments(block, name, h, skip, emb, ctx):
    """Segments of one ``TimestepEmbedSequential``; returns (segments, name of its output)."""
    segs = []
    for j, layer in enumerate(block.cell_list):
        out = f"{name}.{j}"
        if isinstance(layer, U.ResBlock):
            if skip is not None:
                segs.append(Segment(out, _SkipRes(layer), (h, skip, emb), (out,)))
                skip = None
            else:
                segs.append(Segment(out, _Res(layer), (h, emb), (out,)))
        elif isinstance(layer, U.SpatialTransformer):
            t = f"{out}.in"
            segs.append(Segment(t, _TransformerIn(layer), (h,), (t,)))
            for k, tb in enumerate(layer.transformer_blocks):
                segs.append(Segment(f"{out}.{k}", _TransformerBlock(tb), (t, ctx), (f"{out}.{k}",)))
                t = f"{out}.{k}"
            segs.append(Segment(out, _TransformerOut(layer), (t, h), (out,)))
        else:  # InputConv, Downsample, Upsample
            segs.append(Segment(out, _Layer(layer), (h,), (out,)))
        h = out
    return segs, h


def unet_segments(unet, x="x", timesteps="timesteps", context="context", y="y", pred="pred", prefix="unet."):
    """The segments computing ``pred = unet(x, timesteps, context, y)`` from those named tensors.

    The U-Net's layers switch to the forms that are faster in graphs of a few layers
    (``layers.short_graph_forms``)."""
    layers.short_graph_forms(unet)
    emb, ctx = prefix + "emb", prefix + "ctx"
    segs = [Segment(prefix + "stem", _Stem(unet), (x, timesteps, context, y), (emb, ctx))]
    h = x
    skips = []
    for i, block in enumerate(unet.input_blocks):
        block_segs, h = _block_segments(block, f"{prefix}input_blocks.{i}", h, None, emb, ctx)
        segs += block_segs
        skips.append(h)
    block_segs, h = _block_segments(unet.middle_block, prefix + "middle_block", h, None, emb, ctx)
    segs += block_segs
    for i, block in enumerate(unet.output_blocks):
        block_segs, h = _block_segments(block, f"{prefix}output_blocks.{i}", h, skips.pop(), emb, ctx)
        segs += block_segs
    segs.append(Segment(prefix + "head", _Head(unet.out), (h,), (pred,)))
    return segs

