"""Parity of library.autoencoder_kl against diffusers' AutoencoderKL (torch, CPU) on the same weights."""
import numpy as np
import pytest
import torch

from conftest import assert_close

import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from library.autoencoder_kl import (SCALING_FACTOR, VAE_SCALE_FACTOR, AutoencoderKL, AutoencoderKLConfig,
                                    DiagonalGaussian, VAEDecode, VAEEncode, create_vae, sample_latents)
from library.layers import load_param_dict, param_dict


def _diffusers_autoencoder_kl():
    """diffusers' AutoencoderKL class. diffusers imports transformers (for its LoRA loaders) when it is
    installed; with a huggingface_hub that this transformers refuses, that import fails although the VAE
    does not need transformers at all, so retry with diffusers' transformers flag off."""
    try:
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL as Ref
    except (ImportError, RuntimeError):
        import diffusers.utils.import_utils as import_utils

        import_utils._transformers_available = False
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL as Ref
    return Ref


TINY = AutoencoderKLConfig.tiny(attn_chunk_size=64)  # chunking engages from 8x8 latents up
SHAPES = [(1, 3, 32, 32), (1, 3, 24, 40)]


def _make_pair(config, seed=0):
    torch.manual_seed(seed)
    ref = _diffusers_autoencoder_kl()(**config.diffusers_kwargs()).eval()
    with torch.no_grad():
        # torch initialises GroupNorm to 1/0: randomise so a swapped weight/bias or group count shows
        for name, p in ref.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn_like(p))
    ours = create_vae(config, init=False)
    load_param_dict(ours, {k: v.detach().numpy() for k, v in ref.state_dict().items()})
    return ref, ours


@pytest.fixture(scope="module")
def tiny_pair():
    return _make_pair(TINY)


def test_scaling_factor():
    assert SCALING_FACTOR == VAE_SCALE_FACTOR == 0.13025
    assert AutoencoderKLConfig().scaling_factor == 0.13025


def test_parameter_names_match_diffusers(tiny_pair):
    ref, ours = tiny_pair
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: v.shape for k, v in param_dict(ours).items()}
    assert our_shapes == ref_shapes
    for name in ("encoder.down_blocks.0.downsamplers.0.conv.weight",
                 "encoder.mid_block.attentions.0.to_out.0.weight",
                 "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                 "decoder.up_blocks.0.upsamplers.0.conv.weight",
                 "quant_conv.weight", "post_quant_conv.bias"):
        assert name in our_shapes
    # the encode/decode cells do not rename parameters
    assert [p.name for p in VAEEncode(ours).get_parameters()] == [p.name for p in ours.get_parameters()]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[2]}x{s[3]}")
def test_encode_decode_parity(tiny_pair, ms_mode, shape):
    ref, ours = tiny_pair
    x = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        ref_mean, ref_logvar = post.mean.numpy(), post.logvar.numpy()
        ref_img = ref.decode(torch.from_numpy(ref_mean)).sample.numpy()
        ref_full = ref(torch.from_numpy(x), sample_posterior=False).sample.numpy()
    mean, logvar = VAEEncode(ours)(Tensor(x))
    assert_close(mean.asnumpy(), ref_mean, what="mean")
    assert_close(logvar.asnumpy(), ref_logvar, what="logvar")
    img = VAEDecode(ours)(Tensor(ref_mean))
    assert img.shape == shape
    assert_close(img.asnumpy(), ref_img, what="decode")
    assert_close(ours(Tensor(x)).asnumpy(), ref_full, what="reconstruction")
    # the segmented encode and decode (latent caching, inference) compute the same
    from library.vae_segments import SegmentedDecode, SegmentedEncode

    seg_mean, seg_logvar = SegmentedEncode(ours)(Tensor(x))
    assert_close(seg_mean.asnumpy(), ref_mean, what="segmented mean")
    assert_close(seg_logvar.asnumpy(), ref_logvar, what="segmented logvar")
    assert_close(SegmentedDecode(ours)(Tensor(ref_mean)).asnumpy(), ref_img, what="segmented decode")
    assert [p.name for p in ours.get_parameters()] == [p.name for p in VAEEncode(ours).get_parameters()]


def test_chunked_attention_matches_plain(tiny_pair):
    ref, ours = tiny_pair
    plain = create_vae(AutoencoderKLConfig.tiny(attn_chunk_size=0), init=False)
    load_param_dict(plain, param_dict(ours))
    z = np.random.default_rng(2).standard_normal((1, 4, 10, 13)).astype(np.float32)  # 130 tokens: chunks 64+64+2
    a = VAEDecode(ours)(Tensor(z)).asnumpy()
    b = VAEDecode(plain)(Tensor(z)).asnumpy()
    assert_close(a, b, rtol_scale=1e-5, what="chunked vs plain attention")


def test_logvar_clamp_and_sampling():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ref, ours = _make_pair(TINY)
    with torch.no_grad():
        ref.quant_conv.bias[4] = 100.0  # logvar channels 0 and 1 far outside [-30, 20]
        ref.quant_conv.bias[5] = -100.0
    ours.quant_conv.bias.set_data(Tensor(ref.quant_conv.bias.detach().numpy()))
    x = np.random.default_rng(3).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = ours.encode(Tensor(x))
    lv = logvar.asnumpy()
    assert lv[:, 0].min() == 20.0 and lv[:, 1].max() == -30.0
    assert_close(lv, post.logvar.numpy(), what="clamped logvar")

    noise = np.random.default_rng(4).standard_normal(mean.shape).astype(np.float32)
    expect = post.mean.numpy() + post.std.numpy() * noise
    assert_close(sample_latents(mean, logvar, Tensor(noise)).asnumpy(), expect, what="sample")
    dist = DiagonalGaussian(mean, logvar)
    assert_close(dist.sample(Tensor(noise)).asnumpy(), expect, what="DiagonalGaussian.sample")
    assert_close(dist.kl().asnumpy(), post.kl().numpy(), what="kl")
    drawn = DiagonalGaussian(mean, logvar, seed=0).sample()
    assert drawn.shape == mean.shape and np.isfinite(drawn.asnumpy()).all()


class _DecodeLoss(nn.Cell):
    def __init__(self, vae):
        super().__init__(auto_prefix=False)
        self.decode = VAEDecode(vae)

    def construct(self, z, target):
        return (self.decode(z) * target).sum()


GRAD_PARAMS = ("decoder.conv_in.weight", "decoder.mid_block.attentions.0.to_q.weight",
               "decoder.mid_block.attentions.0.group_norm.weight",
               "decoder.up_blocks.0.resnets.1.norm2.bias", "post_quant_conv.weight")


def test_decode_gradient_parity(tiny_pair, ms_mode):
    ref, ours = tiny_pair
    rng = np.random.default_rng(5)
    z = rng.standard_normal((1, 4, 12, 10)).astype(np.float32)  # 120 mid tokens: chunked path too
    target = rng.standard_normal((1, 3, 24, 20)).astype(np.float32)

    ref_params = dict(ref.named_parameters())
    ref.zero_grad()
    (ref.decode(torch.from_numpy(z)).sample * torch.from_numpy(target)).sum().backward()

    params = {p.name: p for p in ours.get_parameters()}
    weights = ParameterTuple([params[n] for n in GRAD_PARAMS])
    loss_cell = _DecodeLoss(ours)
    grads = ops.GradOperation(get_by_list=True)(loss_cell, weights)(Tensor(z), Tensor(target))
    for name, g in zip(GRAD_PARAMS, grads):
        expect = ref_params[name].grad.numpy()
        err = np.abs(g.asnumpy() - expect).max()
        assert err <= 1e-3 * np.abs(expect).max(), f"grad {name}: max abs err {err:.3g}, ref max {np.abs(expect).max():.3g}"
    ref.zero_grad()


@pytest.mark.slow
def test_full_sdxl_vae_structure_and_decode():
    config = AutoencoderKLConfig()
    torch.manual_seed(0)
    ref = _diffusers_autoencoder_kl()(**config.diffusers_kwargs()).eval()
    ref_state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours = create_vae(config, init=False)
    ours_shapes = {k: v.shape for k, v in param_dict(ours).items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref_state.items()}
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(int(np.prod(s)) for s in ours_shapes.values())
    assert n_ours == n_ref == 83_653_863
    load_param_dict(ours, ref_state)
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 12)).astype(np.float32)
    with torch.no_grad():
        expect = ref.decode(torch.from_numpy(z)).sample.numpy()
    assert_close(VAEDecode(ours)(Tensor(z)).asnumpy(), expect, what="full-size decode")
