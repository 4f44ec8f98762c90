"""SDXL UNet (library/sdxl_original_unet.py) against diffusers' UNet2DConditionModel.

A tiny configuration of the SDXL topology (3 levels, 2 res blocks, attention on
levels 1 and 2 and in the middle, linear projections, text_time additional
embedding) is initialised in torch, converted with
``convert_diffusers_unet_state_dict_to_sdxl`` and loaded by name into ours.
Our ``y`` is built the SGM/kohya way (pooled text embedding + sinusoidal size
embeddings, outside the model) while diffusers builds it inside from
``text_embeds``/``time_ids``: equal outputs cover that path too.
"""
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import assert_close  # noqa: E402  (conftest imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import ParameterTuple, Tensor, nn, ops  # noqa: E402

from library import layers  # noqa: E402
from library.sdxl_model_util import (  # noqa: E402
    convert_diffusers_unet_state_dict_to_sdxl, convert_sdxl_unet_state_dict_to_diffusers)
from library.sdxl_original_unet import (  # noqa: E402
    SdxlUNet2DConditionModel, SdxlUNetConfig, get_size_embeddings)


TIME_DIM = 8  # addition_time_embed_dim (256 in SDXL)
POOLED_DIM = 16  # 1280 in SDXL
TINY = SdxlUNetConfig(model_channels=32, num_head_channels=8, transformer_depth=(0, 1, 1),
                      context_dim=32, adm_in_channels=POOLED_DIM + 6 * TIME_DIM)

SDXL_PARAMS = 2_567_463_684


def diffusers_config(cfg: SdxlUNetConfig, time_dim: int):
    """diffusers UNet2DConditionModel kwargs of the SDXL topology for one of our configs."""
    chans = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth)
    up = tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth))
    pooled = cfg.adm_in_channels - 6 * time_dim
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=down, up_block_types=up, block_out_channels=chans,
        layers_per_block=cfg.num_res_blocks,
        # diffusers' SDXL config gives the number of heads here (5, 10, 20)
        attention_head_dim=tuple(c // cfg.num_head_channels for c in chans),
        # the middle block takes the last level's depth in diffusers (as in our default)
        transformer_layers_per_block=tuple(max(d, 1) for d in cfg.transformer_depth),
        cross_attention_dim=cfg.context_dim, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim,
        norm_num_groups=cfg.norm_num_groups)


@pytest.fixture(scope="module")
def reference():
    """(torch model, diffusers state dict as numpy, inputs)."""
    torch.manual_seed(0)
    du = UNet2DConditionModel(**diffusers_config(TINY, TIME_DIM)).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped or skipped norm fails
        for name, p in du.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    sd = {k: v.detach().numpy().copy() for k, v in du.state_dict().items()}
    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((2, POOLED_DIM)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 8, 832, 640]], np.float32)
    size_emb = get_size_embeddings(time_ids[:, 0:2], time_ids[:, 2:4], time_ids[:, 4:6], dim=TIME_DIM)
    inputs = dict(
        x=rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
        t=np.array([999.0, 17.0], np.float32),
        context=rng.standard_normal((2, 7, TINY.context_dim)).astype(np.float32),
        y=np.concatenate([pooled, size_emb], -1).astype(np.float32),
        pooled=pooled, time_ids=time_ids,
        weight=rng.standard_normal((2, 4, 16, 16)).astype(np.float32))
    return du, sd, inputs


def _torch_forward(du, inp):
    return du(torch.tensor(inp["x"]), torch.tensor(inp["t"]), torch.tensor(inp["context"]),
              added_cond_kwargs={"text_embeds": torch.tensor(inp["pooled"]),
                                 "time_ids": torch.tensor(inp["time_ids"])}).sample


def _ours(sd, impl="plain", chunk_size=None, checkpointing=False):
    with layers.skip_init():
        net = SdxlUNet2DConditionModel(TINY)
    layers.load_param_dict(net, convert_diffusers_unet_state_dict_to_sdxl(sd))
    net.set_attention_impl(impl, chunk_size)
    net.set_gradient_checkpointing(checkpointing)
    return net


def _ms_inputs(inp):
    return [Tensor(inp[k]) for k in ("x", "t", "context", "y")]


@pytest.mark.parametrize("impl,chunk", [("plain", None), ("chunked", 48)])
def test_forward_parity(reference, ms_mode, impl, chunk):
    du, sd, inp = reference
    with torch.no_grad():
        ref = _torch_forward(du, inp).numpy()
    net = _ours(sd, impl, chunk)  # chunk 48 < 64 tokens at level 1: uneven query blocks
    out = net(*_ms_inputs(inp)).asnumpy()
    assert_close(out, ref, what=f"UNet output ({ms_mode}, {impl})")


class _LossGrads(nn.Cell):
    def __init__(self, net, weights):
        super().__init__()
        self.net = net
        self.weights = ParameterTuple(weights)
        self.grad = ops.GradOperation(get_by_list=True)

    def loss(self, x, t, context, y, w):
        return (self.net(x, t, context, y) * w).sum()

    def construct(self, x, t, context, y, w):
        return self.grad(self.loss, self.weights)(x, t, context, y, w)


# (our name, diffusers name): a conv, a cross-attention key projection, norms, label_emb
GRAD_PARAMS = [
    ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
    ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
    ("output_blocks.3.1.transformer_blocks.0.norm1.weight",
     "up_blocks.1.attentions.0.transformer_blocks.0.norm1.weight"),
    ("middle_block.0.out_layers.0.bias", "mid_block.resnets.0.norm2.bias"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("output_blocks.2.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
]


@pytest.fixture(scope="module")
def torch_grads(reference):
    du, _, inp = reference
    du.zero_grad()
    loss = (_torch_forward(du, inp) * torch.tensor(inp["weight"])).sum()
    loss.backward()
    params = dict(du.named_parameters())
    return [params[d].grad.numpy().copy() for _, d in GRAD_PARAMS]


class _WeightedSum(nn.Cell):
    def construct(self, pred, w):
        return (pred * w).sum()


def _segmented_grads(net, params, inp):
    """The same gradients through the segmented U-Net (``--gradient_checkpointing``'s path)."""
    from library.segments import Segment, SegmentChain
    from library.unet_segments import unet_segments

    segs = unet_segments(net) + [Segment("loss", _WeightedSum(), ("pred", "w"), ("loss",))]
    chain = SegmentChain(segs, ("x", "timesteps", "context", "y", "w"), params)
    values = chain.forward(dict(zip(chain.data, _ms_inputs(inp) + [Tensor(inp["weight"])])))
    return chain.backward(values, {"loss": ops.ones_like(values["loss"])})


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "segmented"])
def test_gradient_parity(reference, torch_grads, ms_mode, checkpointing):
    _, sd, inp = reference
    net = _ours(sd, checkpointing=checkpointing)
    params = {p.name: p for p in net.get_parameters()}
    wanted = [params[o] for o, _ in GRAD_PARAMS]
    if checkpointing:
        grads = _segmented_grads(net, wanted, inp)
    else:
        grads = _LossGrads(net, wanted)(*_ms_inputs(inp), Tensor(inp["weight"]))
    for (name, _), g, ref in zip(GRAD_PARAMS, grads, torch_grads):
        err = np.abs(g.asnumpy() - ref).max()
        assert err <= 1e-4 * np.abs(ref).max(), f"grad {name}: max abs error {err:.3g}, max|ref| {np.abs(ref).max():.3g}"


def test_converter_round_trip(reference):
    _, sd, _ = reference
    sgm = convert_diffusers_unet_state_dict_to_sdxl(sd)
    with layers.skip_init():
        net = SdxlUNet2DConditionModel(TINY)
    ours = {p.name: tuple(p.shape) for p in net.get_parameters()}
    assert {k: v.shape for k, v in sgm.items()} == ours
    back = convert_sdxl_unet_state_dict_to_diffusers(sgm)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k] is v
    with pytest.raises(ValueError, match="not in the diffusers layout"):
        convert_diffusers_unet_state_dict_to_sdxl({**sd, "foo.bar": np.zeros(1)})


def test_flash_attention_refused_off_ascend():
    with layers.skip_init():
        net = SdxlUNet2DConditionModel(TINY)
    with pytest.raises(ValueError, match="Ascend"):
        net.set_attention_impl("flash")
    with pytest.raises(ValueError, match="unknown attention"):
        net.set_attention_impl("xformers")


@pytest.mark.parametrize("flags,ascend,cpu", [
    (dict(), None, None),
    (dict(sdpa=True), "flash", "plain"),
    (dict(xformers=True, sdpa=True), "flash", "chunked"),
    (dict(mem_eff_attn=True, xformers=True), "chunked", "chunked"),
    (dict(flash_attn=True), "flash", "flash"),
])
def test_kohya_attention_flags(flags, ascend, cpu):
    """kohya's precedence (replace_unet_modules: mem_eff_attn, xformers, sdpa) and what each means here;
    the U-Net's kohya switches follow the same table."""
    from library.attention import attention_impl_for_flags

    assert attention_impl_for_flags(flags, "Ascend") == ascend
    assert attention_impl_for_flags(flags, "CPU") == cpu
    with layers.skip_init():
        net = SdxlUNet2DConditionModel(TINY)
    xformers, mem_eff = bool(flags.get("xformers")), bool(flags.get("mem_eff_attn"))
    net.set_use_memory_efficient_attention(xformers=xformers, mem_eff=mem_eff)
    assert net.attention_impl == ("chunked" if xformers or mem_eff else "plain")  # on the CPU
    net.set_use_sdpa(bool(flags.get("sdpa")))
    assert net.attention_impl == "plain"  # torch's sdpa is exact attention: the plain one on the CPU


def test_half_precision_runs(reference):
    _, sd, inp = reference
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = _ours(sd).to_dtype(ms.float16)
    x, t, context, y = _ms_inputs(inp)
    out = net(x.astype(ms.float16), t, context.astype(ms.float16), y.astype(ms.float16))
    assert out.dtype == ms.float16
    assert np.isfinite(out.asnumpy()).all()


def _diffusers_sdxl_shapes():
    """Names and shapes of SDXL base's diffusers UNet, built on the meta device (no memory)."""
    with torch.device("meta"):
        du = UNet2DConditionModel(**diffusers_config(SdxlUNetConfig(), 256))
    return {k: tuple(v.shape) for k, v in du.state_dict().items()}


@pytest.mark.slow
def test_full_sdxl_names_and_count():
    with layers.skip_init():
        net = SdxlUNet2DConditionModel()
    ours = {p.name: tuple(p.shape) for p in net.get_parameters()}
    assert sum(int(np.prod(s)) for s in ours.values()) == SDXL_PARAMS
    du_shapes = _diffusers_sdxl_shapes()
    converted = convert_diffusers_unet_state_dict_to_sdxl(du_shapes)
    assert converted == ours
