"""networks/lora.py: kohya's module set and names on full SDXL, block-wise dims and
learning rates, LoRA+, and the module math (merged == unmerged, zero up == base,
dropout only in training, multiplier changes without recompiling)."""
import math

import numpy as np
import pytest

from conftest import assert_close  # noqa: E402  (imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import Parameter, Tensor, nn  # noqa: E402

from library import clip_text_model as ctm  # noqa: E402
from library import layers  # noqa: E402
from library.device_utils import UserError  # noqa: E402
from library.sdxl_original_unet import (Downsample, ResBlock, SdxlUNet2DConditionModel, SpatialTransformer,  # noqa: E402
                                        TimestepEmbedSequential, Upsample)
from networks import lora  # noqa: E402

# ---------------------------------------------------------------------------
# full SDXL, built with 1-element parameters (names and layer sizes only)


@pytest.fixture(scope="module")
def full_sdxl():
    original = layers._param
    layers._param = lambda shape, bound=None, fill=None, name=None: Parameter(Tensor(np.zeros((1,), np.float32)),
                                                                               name=name)
    try:
        unet = SdxlUNet2DConditionModel()
        te1 = ctm.sdxl_text_encoder1(vocab_size=8)  # vocabulary size does not change any LoRA name
        te2 = ctm.sdxl_text_encoder2(vocab_size=8)
    finally:
        layers._param = original
    return te1, te2, unet


def expected_sdxl_names(conv=False):
    """kohya's rule written out for SDXL base, independently of the model code: every Linear of each
    Transformer2DModel (proj_in/out; attn1/attn2 to_q/k/v/out.0; ff.net.0.proj; ff.net.2); with conv_dim
    also ResnetBlock2D (in_layers.2, emb_layers.1, out_layers.3, skip_connection when channels change),
    Downsample2D (op) and Upsample2D (conv). Text encoders: self_attn q/k/v/out_proj, mlp fc1/fc2."""
    depth = {0: 0, 1: 2, 2: 10}
    chans = {0: 320, 1: 640, 2: 1280}
    transformers, resblocks = [], []
    ch = 320
    n = 1
    for level in range(3):
        for _ in range(2):
            resblocks.append((f"input_blocks_{n}_0", ch != chans[level]))
            ch = chans[level]
            if depth[level]:
                transformers.append((f"input_blocks_{n}_1", depth[level]))
            n += 1
        n += 1 if level < 2 else 0
    resblocks += [("middle_block_0", False), ("middle_block_2", False)]
    transformers.append(("middle_block_1", 10))
    n = 0
    for level in (2, 1, 0):
        for _ in range(3):
            resblocks.append((f"output_blocks_{n}_0", True))  # skip concat: channels always change
            if depth[level]:
                transformers.append((f"output_blocks_{n}_1", depth[level]))
            n += 1
    names = set()
    for prefix, d in transformers:
        names |= {f"lora_unet_{prefix}_proj_in", f"lora_unet_{prefix}_proj_out"}
        for b in range(d):
            for attn in ("attn1", "attn2"):
                for leaf in ("to_q", "to_k", "to_v", "to_out_0"):
                    names.add(f"lora_unet_{prefix}_transformer_blocks_{b}_{attn}_{leaf}")
            names |= {f"lora_unet_{prefix}_transformer_blocks_{b}_ff_net_0_proj",
                      f"lora_unet_{prefix}_transformer_blocks_{b}_ff_net_2"}
    if conv:
        for prefix, skip in resblocks:
            names |= {f"lora_unet_{prefix}_in_layers_2", f"lora_unet_{prefix}_emb_layers_1",
                      f"lora_unet_{prefix}_out_layers_3"}
            if skip:
                names.add(f"lora_unet_{prefix}_skip_connection")
        names |= {"lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op",
                  "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv"}
    te = set()
    for prefix, layers_ in (("lora_te1", 12), ("lora_te2", 32)):
        for i in range(layers_):
            for leaf in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                         "mlp_fc1", "mlp_fc2"):
                te.add(f"{prefix}_text_model_encoder_layers_{i}_{leaf}")
    return names, te


def test_full_sdxl_module_counts_and_names(full_sdxl):
    te1, te2, unet = full_sdxl
    net = lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet)
    unet_names = [m.lora_name for m in net.unet_loras]
    te_names = [m.lora_name for m in net.text_encoder_loras]
    assert len(unet_names) == 722
    assert sum(n.startswith("lora_te1_") for n in te_names) == 72
    assert sum(n.startswith("lora_te2_") for n in te_names) == 192
    exp_unet, exp_te = expected_sdxl_names()
    assert set(unet_names) == exp_unet and set(te_names) == exp_te
    for key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te2_text_model_encoder_layers_31_mlp_fc2"):
        assert key in set(unet_names) | set(te_names)
    by = {m.lora_name: m for m in net.loras}
    m = by["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]
    assert tuple(m.lora_down.weight.shape) == (4, 2048) and tuple(m.lora_up.weight.shape) == (640, 4)
    m = by["lora_te2_text_model_encoder_layers_31_mlp_fc2"]
    assert tuple(m.lora_down.weight.shape) == (4, 5120) and tuple(m.lora_up.weight.shape) == (1280, 4)
    sd = net.state_dict()
    assert len(sd) == 3 * (722 + 72 + 192)
    assert {"lora_te2_text_model_encoder_layers_31_mlp_fc2." + s for s in
            ("alpha", "lora_down.weight", "lora_up.weight")} <= set(sd)


def test_full_sdxl_conv_modules(full_sdxl):
    te1, te2, unet = full_sdxl
    net = lora.create_network(1.0, 8, 4.0, None, [te1, te2], unet, conv_dim="2", conv_alpha="1")
    exp_unet, _ = expected_sdxl_names(conv=True)
    names = {m.lora_name for m in net.unet_loras}
    assert names == exp_unet and len(names) == 788
    by = {m.lora_name: m for m in net.unet_loras}
    m = by["lora_unet_input_blocks_3_0_op"]  # 3x3 stride 2: down keeps kernel/stride/padding, up 1x1
    assert tuple(m.lora_down.weight.shape) == (2, 320, 3, 3) and tuple(m.lora_up.weight.shape) == (320, 2, 1, 1)
    assert m.lora_down.stride == 2 and m.lora_down.padding == 1 and m.scale == 0.5
    m = by["lora_unet_output_blocks_0_0_skip_connection"]  # 1x1 conv takes network_dim like Linear
    assert tuple(m.lora_down.weight.shape) == (8, 2560, 1, 1) and m.scale == 0.5
    m = by["lora_unet_middle_block_0_emb_layers_1"]
    assert tuple(m.lora_down.weight.shape) == (8, 1280)


def test_train_unet_only_and_te_only(full_sdxl):
    te1, te2, unet = full_sdxl
    net = lora.create_network(1.0, 4, 1.0, None, [te1, te2], None)
    assert not net.unet_loras and len(net.text_encoder_loras) == 264
    net = lora.create_network(1.0, 4, 1.0, None, None, unet)
    assert len(net.unet_loras) == 722 and not net.text_encoder_loras


def test_block_dims_and_lr_weights(full_sdxl):
    te1, te2, unet = full_sdxl
    dims = [0] + [i % 5 + 1 for i in range(21)] + [0]
    alphas = [float(d) / 2 for d in dims]
    conv_dims = [0] * 5 + [3] * 18
    net = lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet, block_dims=",".join(map(str, dims)),
                              block_alphas=",".join(map(str, alphas)), conv_block_dims=",".join(map(str, conv_dims)),
                              down_lr_weight="1,1,1,1,1,1,1,1,0", mid_lr_weight="0.5,0.5,0.5",
                              up_lr_weight="cosine", block_lr_zero_threshold="0.1")
    for m in net.unet_loras:
        idx = lora.get_block_index(m.lora_name, True)
        assert 1 <= idx <= 21
        conv3 = m.is_conv and m.kernel_size == 3
        want = conv_dims[idx] if conv3 else dims[idx]
        if idx == 9:  # down_lr_weight 0 for input_blocks_8: removed
            want = 0
        assert m.lora_dim == want and (conv3 or math.isclose(m.scale, alphas[idx] / dims[idx]))
    assert not any(m.lora_name.startswith("lora_unet_input_blocks_8_") for m in net.unet_loras)
    assert not any(m.lora_name.startswith("lora_unet_input_blocks_1_") and m.is_conv for m in net.unet_loras)
    cos = [math.sin(math.pi * (i / 8) / 2) for i in reversed(range(9))]
    expected = [1.0] + [1.0] * 8 + [0] + [0.5] * 3 + [c if c > 0.1 else 0 for c in cos] + [1.0]
    np.testing.assert_allclose(net.block_lr_weight, expected)
    params, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc[0] == "textencoder" and params[0]["lr"] == 1e-5
    for group, d in zip(params[1:], desc[1:]):
        idx = int(d.split("block")[1])
        assert math.isclose(group["lr"], 1e-4 * expected[idx])
    assert "unet_block21" not in desc  # cosine: last up block weight 0 -> no group (and no modules)
    with pytest.raises(UserError, match="23 elements"):
        lora.create_network(1.0, 4, 1.0, None, None, unet, block_dims="1,2,3")
    with pytest.raises(UserError, match="unknown lr weight preset"):
        lora.create_network(1.0, 4, 1.0, None, None, unet, up_lr_weight="wavy")
    with pytest.raises(UserError, match="unknown network_args"):
        lora.create_network(1.0, 4, 1.0, None, None, unet, conv_dims="4")


def test_lr_presets_and_loraplus(full_sdxl):
    te1, te2, unet = full_sdxl
    w = lora.get_block_lr_weight(True, "linear+0.5", None, "sine", 0.0)
    assert len(w) == 23
    np.testing.assert_allclose(w[1:10], [i / 8 + 0.5 for i in range(9)])
    np.testing.assert_allclose(w[13:22], [math.sin(math.pi * (i / 8) / 2) for i in range(9)])
    net = lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet, loraplus_lr_ratio="16",
                              loraplus_text_encoder_lr_ratio="4")
    params, desc = net.prepare_optimizer_params(None, 2e-4, 1e-4)
    assert desc == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in params] == [1e-4, 4e-4, 2e-4, 16 * 2e-4]
    ups = {id(m.lora_up.weight) for m in net.loras}
    assert all(id(p) in ups for p in params[1]["params"] + params[3]["params"])
    assert len(params[2]["params"]) == len(params[3]["params"]) == 722
    # lr 0 for the text encoder: its group is dropped (kohya)
    params, desc = net.prepare_optimizer_params(0, 2e-4, 1e-4)
    assert desc == ["unet", "unet plus"]
    # --text_encoder_lr with one value per text encoder: a group (and its LoRA+ group) each
    params, desc = net.prepare_optimizer_params([1e-5, 3e-5], 2e-4, 1e-4)
    assert desc == ["textencoder 1", "textencoder 1 plus", "textencoder 2", "textencoder 2 plus", "unet", "unet plus"]
    assert [g["lr"] for g in params] == [1e-5, 4e-5, 3e-5, 12e-5, 2e-4, 16 * 2e-4]
    names = {id(p): m.lora_name for m in net.loras for p in (m.lora_down.weight, m.lora_up.weight)}
    for group, prefix in ((params[0], "lora_te1_"), (params[1], "lora_te1_"), (params[2], "lora_te2_")):
        assert group["params"] and all(names[id(p)].startswith(prefix) for p in group["params"])
    assert len(params[0]["params"]) + len(params[2]["params"]) == len(net.text_encoder_loras)
    params, desc = net.prepare_optimizer_params([1e-5], 2e-4, 1e-4)  # one value: both, one group
    assert desc[:2] == ["textencoder", "textencoder plus"] and params[0]["lr"] == 1e-5


# ---------------------------------------------------------------------------
# math on a small UNet-like model and the tiny text encoder


class MiniUNet(nn.Cell):
    """ResBlock (channel change) + SpatialTransformer, Downsample, Upsample: every LoRA target kind."""

    def __init__(self):
        super().__init__()
        self.input_blocks = nn.CellList([
            TimestepEmbedSequential([ResBlock(8, 16, 12, groups=4), SpatialTransformer(16, 2, 8, 1, 12, groups=4)]),
            TimestepEmbedSequential([Downsample(16)]),
        ])
        self.output_blocks = nn.CellList([TimestepEmbedSequential([Upsample(16)])])

    def construct(self, x, emb, context):
        for block in self.input_blocks:
            x = block(x, emb, context)
        for block in self.output_blocks:
            x = block(x, emb, context)
        return x


def _mini_inputs():
    rng = np.random.default_rng(0)
    return (Tensor(rng.standard_normal((2, 8, 8, 8)).astype(np.float32)),
            Tensor(rng.standard_normal((2, 12)).astype(np.float32)),
            Tensor(rng.standard_normal((2, 5, 12)).astype(np.float32)))


def _randomize_up(net, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    for m in net.loras:
        m.lora_up.weight.set_data(Tensor(scale * rng.standard_normal(m.lora_up.weight.shape).astype(np.float32)))


def test_forward_equals_merged_and_zero_up_is_base(ms_mode, tmp_path):
    layers.set_init_seed(0)
    model = MiniUNet()
    model.set_train(False)
    names_before = sorted(p.name for p in model.get_parameters())
    inputs = _mini_inputs()
    base = model(*inputs).asnumpy()
    net = lora.create_network(1.0, 3, 1.5, None, None, model, conv_dim="2", conv_alpha="0.5")
    kinds = {(m.is_conv, m.kernel_size) for m in net.unet_loras}
    assert kinds == {(False, None), (True, 3), (True, 1)}
    net.apply_to(None, model)
    names_after = [p.name for p in model.get_parameters()]
    assert len(set(names_after)) == len(names_after)
    assert set(names_before) <= set(names_after)  # the base layers keep their names
    assert "input_blocks.0.1.transformer_blocks.0.attn2.to_k.lora_down.weight" in names_after
    np.testing.assert_array_equal(model(*inputs).asnumpy(), base)  # up = 0 -> exactly the base model

    _randomize_up(net)
    applied = model(*inputs).asnumpy()
    assert np.abs(applied - base).max() > 1e-2
    net.set_multiplier(0.5)  # a Parameter: the compiled graph sees the new value
    half = model(*inputs).asnumpy()
    path = str(tmp_path / "mini.safetensors")
    net.save_weights(path, None, None)

    for multiplier, want in ((1.0, applied), (0.5, half)):
        layers.set_init_seed(0)
        fresh = MiniUNet()
        fresh.set_train(False)
        inf, sd = lora.create_network_from_weights(multiplier, path, None, None, fresh, for_inference=True)
        inf.merge_to(None, fresh, sd)
        err = assert_close(fresh(*inputs).asnumpy(), want, what=f"merged (multiplier {multiplier})")
        print(f"{ms_mode}: unmerged vs merged max abs err {err:.2e}")


def test_dropouts_only_in_training():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    layers.set_init_seed(0)
    lin = layers.Linear(6, 5)
    x = Tensor(np.random.default_rng(1).standard_normal((4, 3, 6)).astype(np.float32))
    base = lin(x).asnumpy()
    m = lora.LoRAModule("lora_x", lin, 1.0, 1, 1.0, rank_dropout=0.75)
    m.lora_up.weight.set_data(Tensor(np.ones((5, 1), np.float32)))
    m.set_train(False)
    full = m(x).asnumpy() - base
    assert np.abs(full).max() > 1e-3
    m.set_train(True)
    seen = set()
    for _ in range(30):  # rank 1: each sample's LoRA term is either dropped or scaled by 1/(1-p)
        d = m(x).asnumpy() - base
        for b in range(4):
            if np.allclose(d[b], 0, atol=1e-6):
                seen.add("dropped")
            else:
                np.testing.assert_allclose(d[b], full[b] * 4.0, rtol=1e-5, atol=1e-5)
                seen.add("kept")
    assert seen == {"dropped", "kept"}

    m2 = lora.LoRAModule("lora_y", lin, 1.0, 2, 2.0, module_dropout=0.5, dropout=0.3)
    m2.lora_up.weight.set_data(Tensor(np.ones((5, 2), np.float32)))
    m2.set_train(False)
    eval_out = m2(x).asnumpy()
    np.testing.assert_array_equal(eval_out, m2(x).asnumpy())  # deterministic outside training
    m2.set_train(True)
    outs = [m2(x).asnumpy() for _ in range(20)]
    assert any(np.array_equal(o, base) for o in outs)  # whole module dropped sometimes
    assert any(not np.allclose(o, eval_out) and not np.array_equal(o, base) for o in outs)


def test_text_encoder_graph_mode_multiplier_and_train_switch():
    ms.set_context(mode=ms.GRAPH_MODE)
    layers.set_init_seed(0)
    te = ctm.CLIPTextModel(ctm.CLIPTextConfig.tiny())
    te.set_train(False)
    ids = Tensor(np.array([[5, 17, 33, 999, 0]], np.int64))
    base = te(ids)[0].asnumpy()
    net = lora.create_network(1.0, 4, 4.0, None, te, None, rank_dropout="0.5")
    assert net.text_encoder_loras[0].lora_name.startswith("lora_te_text_model_encoder_layers_0_")  # single TE
    net.apply_to(te, None)
    te.set_train(False)
    _randomize_up(net, scale=0.1)
    outs = {}
    for mult in (1.0, 0.0, -1.0, 1.0):
        net.set_multiplier(mult)
        outs.setdefault(mult, []).append(te(ids)[0].asnumpy())
    np.testing.assert_array_equal(outs[0.0][0], base)
    np.testing.assert_array_equal(outs[1.0][0], outs[1.0][1])
    assert np.abs(outs[1.0][0] - base).max() > 1e-3 and np.abs(outs[-1.0][0] - outs[1.0][0]).max() > 1e-3
