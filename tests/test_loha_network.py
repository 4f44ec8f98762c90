"""networks/loha.py (LyCORIS's LoHa, ``--network_module networks.loha``): the module math and gradients
against LyCORIS's formula written in torch, the file layout LyCORIS/ComfyUI/A1111 read, load-back and
the inference merge, the network_args refused with one line."""
import os
import sys

import numpy as np
import pytest

from conftest import assert_close  # noqa: E402  (imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from library import layers  # noqa: E402
from library.device_utils import UserError  # noqa: E402
from networks import loha, lora  # noqa: E402
from networks.network_base import create_network_from_weights_file  # noqa: E402
from test_lora_network import MiniUNet, _mini_inputs  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

LEAVES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def torch_loha_delta(w1a, w1b, w2a, w2b, alpha, weight_shape):
    """LyCORIS (lycoris/functional/loha.py, modules/loha.py): ΔW = (w1a @ w1b) * (w2a @ w2b) * alpha/dim,
    dim = w1b.shape[0], reshaped to the layer weight (a conv's (out, in*kh*kw) -> (out, in, kh, kw))."""
    return ((w1a @ w1b) * (w2a @ w2b) * (alpha / w1b.shape[0])).reshape(weight_shape)


def _randomize(module, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    for leaf in LEAVES:
        p = getattr(module, leaf)
        p.set_data(Tensor((scale * rng.standard_normal(p.shape)).astype(np.float32)))


def _layer(kind):
    if kind == "linear":
        return layers.Linear(6, 5), np.random.default_rng(1).standard_normal((2, 3, 6)).astype(np.float32)
    if kind == "conv3x3":
        return (layers.Conv2d(4, 6, 3, stride=2, padding=1),
                np.random.default_rng(1).standard_normal((2, 4, 7, 7)).astype(np.float32))
    return layers.Conv2d(4, 6, 1), np.random.default_rng(1).standard_normal((2, 4, 5, 5)).astype(np.float32)


def _torch_forward(layer, kind, x, delta):
    w = torch.from_numpy(layer.weight.asnumpy())
    b = torch.from_numpy(layer.bias.asnumpy())
    if kind == "linear":
        return F.linear(x, w, b) + F.linear(x, delta)
    stride, padding = (2, 1) if kind == "conv3x3" else (1, 0)
    return F.conv2d(x, w, b, stride=stride, padding=padding) + F.conv2d(x, delta, stride=stride, padding=padding)


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
def test_module_forward_and_gradients_match_lycoris_formula(ms_mode, kind):
    """LoHaModule(x) == layer(x) + op(x, multiplier * ΔW) with LyCORIS's ΔW, and the gradient of each hada
    factor equals torch autograd's on the same loss (each compared to its own scale). At creation ΔW is 0
    (hada_w2_a zero, the other three normal), so the wrapped layer is the layer."""
    layers.set_init_seed(0)
    layer, x = _layer(kind)
    base = layer(Tensor(x)).asnumpy()
    m = loha.LoHaModule("lora_x", layer, multiplier=0.7, lora_dim=3, alpha=2.0)
    assert not np.any(m.hada_w2_a.asnumpy())
    assert all(np.abs(getattr(m, leaf).asnumpy()).max() > 0 for leaf in ("hada_w1_a", "hada_w1_b", "hada_w2_b"))
    m.set_train(False)
    np.testing.assert_array_equal(m(Tensor(x)).asnumpy(), base)

    _randomize(m, seed=2)
    hada = {leaf: getattr(m, leaf).asnumpy() for leaf in LEAVES}
    t = {leaf: torch.tensor(v, requires_grad=True) for leaf, v in hada.items()}
    delta = torch_loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], 2.0,
                             tuple(layer.weight.shape)) * 0.7
    want = _torch_forward(layer, kind, torch.from_numpy(x), delta)
    got = m(Tensor(x)).asnumpy()
    assert np.abs(got - base).max() > 1e-2  # the LoHa term is not negligible
    assert_close(got, want.detach().numpy(), what=f"{kind} forward")

    g = np.random.default_rng(3).standard_normal(got.shape).astype(np.float32)
    (want * torch.from_numpy(g)).sum().backward()
    params = [getattr(m, leaf) for leaf in LEAVES]
    g_ms = Tensor(g)

    def loss(inp):
        return (m(inp) * g_ms).sum()

    grads = ms.grad(loss, grad_position=None, weights=params)(Tensor(x))
    for leaf, grad in zip(LEAVES, grads):
        assert_close(grad.asnumpy(), t[leaf].grad.numpy(), rtol_scale=1e-4, what=f"{kind} d loss / d {leaf}")
        assert np.abs(t[leaf].grad.numpy()).max() > 1e-3, leaf


def test_numpy_delta_matches_the_module_and_torch():
    """hada_delta (the merge and the tools) == the module's ΔW == the torch formula."""
    layers.set_init_seed(0)
    conv = layers.Conv2d(4, 6, 3, padding=1)
    m = loha.LoHaModule("lora_c", conv, multiplier=1.0, lora_dim=2, alpha=1.0)
    _randomize(m, seed=5)
    sd = {leaf: getattr(m, leaf).asnumpy() for leaf in LEAVES}
    ref = torch_loha_delta(*(torch.from_numpy(sd[k]) for k in LEAVES), 1.0, (6, 4, 3, 3)).numpy() * 0.5
    assert_close(loha.hada_delta(*(sd[k] for k in LEAVES), 1.0, 0.5).reshape(6, 4, 3, 3), ref, what="hada_delta")
    assert_close(m.get_weight(0.5), ref, what="get_weight")


def _tiny_models(tmp_path):
    import make_tiny_train_demo as demo
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint

    path = str(tmp_path / "tiny.safetensors")
    demo.write_checkpoint(path, seed=0, small=True)
    te1, te2, _vae, unet, _, _ = load_models_from_sdxl_checkpoint(path)
    return te1, te2, unet


def test_saved_file_has_lycoris_layout(tmp_path):
    """The tiny U-Net's LoHa file: kohya's module names (the ones networks.lora names with conv_dim), each
    with exactly LyCORIS's leaves hada_w1_a (out, dim), hada_w1_b (dim, in*kh*kw), hada_w2_a, hada_w2_b
    and a scalar alpha, all in the save precision; read with safetensors' own reader."""
    from safetensors.numpy import load_file

    te1, te2, unet = _tiny_models(tmp_path)
    ref = lora.create_network(1.0, 4, 2, None, [te1, te2], unet, conv_dim="2")  # kohya's module set (not applied)
    layers.set_init_seed(1)
    net = loha.create_network(1.0, 4, 2, None, [te1, te2], unet, conv_dim="2", conv_alpha="1")
    net.apply_to([te1, te2], unet)
    path = str(tmp_path / "loha.safetensors")
    net.save_weights(path, "fp16", {"ss_network_module": "networks.loha"})
    sd = load_file(path)

    names = {m.lora_name for m in ref.loras}
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_unet_") for n in names)
    assert {k.split(".", 1)[0] for k in sd} == names
    assert set(sd) == {f"{n}.{leaf}" for n in names for leaf in LEAVES + ("alpha",)}
    conv3x3 = 0
    for m in ref.loras:
        w = m.org_module.weight.shape
        dim, alpha = (2, 1.0) if m.is_conv and tuple(w[2:]) != (1, 1) else (4, 2.0)
        conv3x3 += dim == 2
        flat_in = int(np.prod(w[1:]))
        n = m.lora_name
        assert sd[f"{n}.hada_w1_a"].shape == sd[f"{n}.hada_w2_a"].shape == (w[0], dim), n
        assert sd[f"{n}.hada_w1_b"].shape == sd[f"{n}.hada_w2_b"].shape == (dim, flat_in), n
        assert sd[f"{n}.alpha"].shape == () and float(sd[f"{n}.alpha"]) == alpha, n
    assert conv3x3 > 0
    assert {v.dtype for v in sd.values()} == {np.dtype(np.float16)}


def test_file_loads_back_and_merges_for_inference(ms_mode, tmp_path):
    """A saved LoHa loads into create_network_from_weights (dims, alphas and conv modules from the file),
    and the inference merge (through the network module the file's keys name, as sdxl_minimal_inference,
    --base_weights and sdxl_merge_lora merge) gives the unmerged model's output."""
    layers.set_init_seed(0)
    model = MiniUNet()
    model.set_train(False)
    inputs = _mini_inputs()
    base = model(*inputs).asnumpy()
    net = loha.create_network(1.0, 3, 1.5, None, None, model, conv_dim="2", conv_alpha="0.5")
    assert {(m.is_conv, m.delta_shape[2:] if m.is_conv else ()) for m in net.unet_loras} == \
        {(False, ()), (True, (3, 3)), (True, (1, 1))}
    net.apply_to(None, model)
    assert "input_blocks.0.1.transformer_blocks.0.attn2.to_k.hada_w1_a" in [p.name for p in model.get_parameters()]
    np.testing.assert_array_equal(model(*inputs).asnumpy(), base)
    for i, m in enumerate(net.loras):
        _randomize(m, seed=10 + i)
    net.set_multiplier(0.5)
    want = model(*inputs).asnumpy()
    assert np.abs(want - base).max() > 1e-2
    path = str(tmp_path / "mini.safetensors")
    net.save_weights(path, None, None)

    layers.set_init_seed(0)
    fresh = MiniUNet()
    back, sd = loha.create_network_from_weights(1.0, path, None, None, fresh)
    assert {m.lora_name: (m.lora_dim, float(m.alpha.asnumpy())) for m in back.loras} == \
        {m.lora_name: (m.lora_dim, float(m.alpha.asnumpy())) for m in net.loras}
    back.apply_to(None, fresh)
    back.load_weights(path)
    for a, b in zip(back.loras, net.loras):
        for leaf in LEAVES:
            np.testing.assert_array_equal(getattr(a, leaf).asnumpy(), getattr(b, leaf).asnumpy())

    layers.set_init_seed(0)
    fresh = MiniUNet()
    fresh.set_train(False)
    inf, sd = create_network_from_weights_file(0.5, path, None, None, fresh)
    assert isinstance(inf, loha.LoHaNetwork)
    inf.merge_to(None, fresh, sd)
    assert_close(fresh(*inputs).asnumpy(), want, what="merged LoHa")


def test_foreign_and_unsupported_files_stop_with_one_line(tmp_path):
    from library.lora_file import save_state_dict_file

    layers.set_init_seed(0)
    model = MiniUNet()
    net = loha.create_network(1.0, 2, 1, None, None, model)
    sd = net.state_dict()
    name = next(iter(sd)).split(".", 1)[0]
    cases = {
        "tucker": (dict(sd, **{f"{name}.hada_t1": np.zeros((2, 2, 1, 1), np.float32)}), "Tucker"),
        "shape": (dict(sd, **{f"{name}.hada_w1_b": np.zeros((2, 99), np.float32)}), "has shape"),
        "lacking": ({k: v for k, v in sd.items() if k != f"{name}.hada_w2_b"}, f"{name} has no hada_w2_b"),
    }
    for case, (weights, match) in cases.items():
        path = str(tmp_path / f"{case}.safetensors")
        save_state_dict_file(path, weights)
        with pytest.raises(UserError, match=match) as e:
            create_network_from_weights_file(1.0, path, None, None, MiniUNet())
        assert "\n" not in str(e.value)
    lokr = str(tmp_path / "lokr.safetensors")
    save_state_dict_file(lokr, {f"{name}.lokr_w1": np.zeros((2, 2), np.float32)})
    with pytest.raises(UserError, match="lokr_w1.*LoKr.*not supported"):
        create_network_from_weights_file(1.0, lokr, None, None, MiniUNet())


@pytest.mark.parametrize("kwargs,match", [
    ({"algo": "lokr"}, "networks.loha trains LoHa only"),
    ({"algo": "lora"}, "networks.lora"),
    ({"use_tucker": "true"}, "use_tucker: LyCORIS option not supported"),
    ({"dropout": "0.1"}, "no dropout on its rank activations"),
    ({"foo": "1"}, "unknown network_args for networks.loha: foo"),
    ({"rank_dropout": "2"}, r"rank_dropout must be in \[0, 1\)"),
])
def test_network_args_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        loha.check_network_args(kwargs, True, 4, 1)
    loha.check_network_args({"algo": "loha", "conv_dim": "2", "conv_alpha": "1", "rank_dropout": "0.1",
                             "module_dropout": "0.1", "dropout": "0"}, True, 4, 1)
