"""The VAE's encode and decode as forward-only chains of compiled segments (``library.segments``).

One graph for the whole encoder or decoder keeps every kernel's buffer until it ends, and the memory
pool it grew stays with the process for the rest of a training run (Limitations.md), and the
1024x1024 decode needs several GB. As chains, one graph per ResBlock, sampler,
attention and head (equal ResBlocks share one compiled graph), with each boundary dropped after its
last reader, the pool only grows to the largest layer's need. Same results as ``VAEEncode`` /
``VAEDecode``.
"""
from mindspore import nn

from library.autoencoder_kl import posterior
from library.segments import Segment, SegmentChain


class _Apply(nn.Cell):
    """``first`` then ``second`` (plain attributes, auto_prefix off: the model's parameter names stay)."""

    def __init__(self, first, second=None, third=None):
        super().__init__(auto_prefix=False)
        self.first = first
        self.second = second
        self.third = third

    def construct(self, x):
        x = self.first(x)
        if self.second is not None:
            x = self.second(x)
        if self.third is not None:
            x = self.third(x)
        return x


class _Posterior(nn.Cell):
    def __init__(self, quant_conv, latent_channels):
        super().__init__(auto_prefix=False)
        self.quant_conv = quant_conv
        self.latent_channels = latent_channels

    def construct(self, h):
        return posterior(self.quant_conv(h), self.latent_channels)


def _chain(layers, outputs_head=None, head_outputs=("out",)):
    segs, h = [], "in"
    for i, layer in enumerate(layers):
        name = f"h{i}"
        segs.append(Segment(name, layer, (h,), (name,)))
        h = name
    if outputs_head is not None:
        segs.append(Segment("head", outputs_head, (h,), head_outputs))
    chain = SegmentChain(segs, ("in",), [])
    chain.set_train(False)
    return chain, h


class SegmentedEncode:
    """``VAEEncode`` as segments: image -> (mean, logvar)."""

    def __init__(self, vae):
        enc = vae.encoder
        layers = [_Apply(enc.conv_in)]
        for block in enc.down_blocks:
            layers += [_Apply(r) for r in block.resnets]
            if block.add_downsample:
                layers.append(_Apply(block.downsamplers[0]))
        mid = enc.mid_block
        layers += [_Apply(mid.resnets[0]), _Apply(mid.attentions[0]), _Apply(mid.resnets[1]),
                   _Apply(enc.conv_norm_out, enc.conv_act, enc.conv_out)]
        self.chain, _ = _chain(layers, _Posterior(vae.quant_conv, vae.latent_channels), ("mean", "logvar"))

    def __call__(self, x):
        values = self.chain.forward({"in": x}, keep=False)
        return values["mean"], values["logvar"]


class SegmentedDecode:
    """``VAEDecode`` as segments: unscaled latents -> image."""

    def __init__(self, vae):
        dec = vae.decoder
        mid = dec.mid_block
        layers = [_Apply(vae.post_quant_conv, dec.conv_in), _Apply(mid.resnets[0]), _Apply(mid.attentions[0]),
                  _Apply(mid.resnets[1])]
        for block in dec.up_blocks:
            layers += [_Apply(r) for r in block.resnets]
            if block.add_upsample:
                layers.append(_Apply(block.upsamplers[0]))
        layers.append(_Apply(dec.conv_norm_out, dec.conv_act, dec.conv_out))
        self.chain, self.output = _chain(layers)

    def __call__(self, z):
        return self.chain.forward({"in": z}, keep=False)[self.output]
