"""Hand-written backward passes (library.attention.SoftmaxAttend, layers.Conv2dStride1)
against torch autograd on the same inputs, in graph mode: input and weight gradients."""
import numpy as np
import pytest
import torch

import mindspore as ms
from mindspore import Tensor, nn, ops

from library import layers
from library.conv_col2im import Conv2dCol
from library.attention import SoftmaxAttend


class _Grads(nn.Cell):
    """Gradients of sum(f(*inputs) * w) with respect to every input."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.grad = ops.GradOperation(get_all=True)

    def loss(self, a, b, c, w):
        return (self.fn(a, b, c) * w).astype(ms.float32).sum()

    def construct(self, a, b, c, w):
        return self.grad(self.loss)(a, b, c, w)


class _TwoInputs(nn.Cell):
    """``layer(a, b) + c``: a (x, weight) layer in ``_Grads``' three-input form (c is zeros)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, a, b, c):
        return self.layer(a, b) + c


def _layer_grads(layer, x, weight, w):
    """(dx, dweight) of sum(layer(x, weight) * w)."""
    return _Grads(_TwoInputs(layer))(Tensor(x), Tensor(weight), Tensor(np.zeros_like(w)), Tensor(w))[:2]


def _close(got, ref, rtol, what):
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= rtol * np.abs(ref).max(), f"{what}: max abs error {err:.3g}, max|ref| {np.abs(ref).max():.3g}"


@pytest.fixture(scope="module")
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.mark.parametrize("n,m", [(40, 40), (40, 7)], ids=["self", "cross"])
def test_softmax_attend_gradients(graph_mode, n, m):
    rng = np.random.default_rng(0)
    q, w = (rng.standard_normal((2, 3, n, 16)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((2, 3, m, 16)).astype(np.float32) for _ in range(2))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    out = torch.softmax(tq @ tk.transpose(-1, -2), -1) @ tv
    (out * torch.tensor(w)).sum().backward()

    grads = _Grads(SoftmaxAttend())(Tensor(q), Tensor(k), Tensor(v), Tensor(w))[:3]
    for name, g, t in zip("qkv", grads, (tq, tk, tv)):
        _close(g.asnumpy(), t.grad.numpy(), 1e-5, f"d{name}")

    # half inputs: fp32 softmax inside, gradients within half precision of fp32
    half = _Grads(SoftmaxAttend())(*(Tensor(a, ms.float16) for a in (q, k, v, w)))
    for name, g, t in zip("qkv", half, (tq, tk, tv)):
        assert g.dtype == ms.float16
        _close(g.asnumpy(), t.grad.numpy(), 1e-2, f"fp16 d{name}")


@pytest.mark.parametrize("short", [False, True], ids=["one_graph_forms", "short_graph_forms"])
@pytest.mark.parametrize("kernel,padding", [(3, 1), (1, 0), (3, 0)])
def test_conv_stride1_gradients(graph_mode, kernel, padding, short):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 9, 9)).astype(np.float32)
    weight = rng.standard_normal((7, 5, kernel, kernel)).astype(np.float32)
    size = 9 + 2 * padding - kernel + 1
    w = rng.standard_normal((2, 7, size, size)).astype(np.float32)
    tx, tweight = torch.tensor(x, requires_grad=True), torch.tensor(weight, requires_grad=True)
    (torch.nn.functional.conv2d(tx, tweight, padding=padding) * torch.tensor(w)).sum().backward()

    conv = layers.Conv2dStride1(5, 7, kernel, padding)
    if short:
        layers.short_graph_forms(conv)
    dx, dweight = _layer_grads(conv, x, weight, w)
    _close(dx.asnumpy(), tx.grad.numpy(), 1e-5, "dx")
    _close(dweight.asnumpy(), tweight.grad.numpy(), 1e-5, "dweight")


@pytest.mark.parametrize("weight_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("stride,padding", [(1, 1), (1, 0), (2, 1), (2, 0)])
def test_conv_as_matmul_gradients(graph_mode, stride, padding, weight_dtype):
    """``Conv2dCol`` (the 3x3 convolution as matmul + Col2Im, for an uncapped oneDNN ISA): output,
    input and weight gradients as torch's, batch 2, fp16-stored weights computed in fp32, in one piece
    and in bands of rows."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 10, 9)).astype(np.float32)
    weight = rng.standard_normal((7, 5, 3, 3)).astype(weight_dtype)
    tx, tweight = torch.tensor(x, requires_grad=True), torch.tensor(weight.astype(np.float32), requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tweight, stride=stride, padding=padding)
    w = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
    (ty * torch.tensor(w)).sum().backward()
    for short, banded in ((False, False), (True, False), (True, True)):
        conv = Conv2dCol(7, 3, padding, stride)
        if short:
            layers.short_graph_forms(conv)
        if banded:  # the smallest bands: one (stride) output row each
            conv.band_bytes = 1
        y = conv(Tensor(x), Tensor(weight))
        _close(y.asnumpy(), ty.detach().numpy(), 1e-6, f"y (banded: {banded})")
        dx, dweight = _layer_grads(conv, x, weight, w)
        assert dx.dtype == ms.float32
        _close(dx.asnumpy(), tx.grad.numpy(), 1e-6, "dx")
        _close(dweight.asnumpy().astype(np.float32), tweight.grad.numpy(), 1e-5 if weight_dtype == np.float32 else 1e-3,
               "dweight")


def test_fp16_stored_weights_compute_in_fp32(graph_mode):
    """fp16-stored weights with fp32 inputs (``--fp16_unet_weights``): ``layers.StoredDense`` and
    ``layers.Conv2dStride1`` compute in fp32 with the fp16 values; gradients as torch's in fp32."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 8)).astype(np.float32)
    weight = rng.standard_normal((5, 8)).astype(np.float16)
    w = rng.standard_normal((2, 6, 5)).astype(np.float32)
    tx, tweight = torch.tensor(x, requires_grad=True), torch.tensor(weight.astype(np.float32), requires_grad=True)
    (torch.nn.functional.linear(tx, tweight) * torch.tensor(w)).sum().backward()
    for short in (False, True):
        dense = layers.StoredDense()
        if short:
            layers.short_graph_forms(dense)
        dx, dweight = _layer_grads(dense, x, weight, w)
        assert dx.dtype == ms.float32 and dweight.dtype == ms.float16
        _close(dx.asnumpy(), tx.grad.numpy(), 1e-6, f"dense dx (short graph forms: {short})")
        _close(dweight.asnumpy(), tweight.grad.numpy(), 1e-3, f"dense dweight (fp16, short graph forms: {short})")

    x = rng.standard_normal((2, 5, 9, 9)).astype(np.float32)
    weight = rng.standard_normal((7, 5, 3, 3)).astype(np.float16)
    w = rng.standard_normal((2, 7, 9, 9)).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    (torch.nn.functional.conv2d(tx, torch.tensor(weight.astype(np.float32)), padding=1)
     * torch.tensor(w)).sum().backward()
    for short in (False, True):
        conv = layers.Conv2dStride1(5, 7, 3, 1)
        if short:
            layers.short_graph_forms(conv)
        dx = _layer_grads(conv, x, weight, w)[0]
        assert dx.dtype == ms.float32
        _close(dx.asnumpy(), tx.grad.numpy(), 1e-5, f"conv dx (short graph forms: {short})")


@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 3), 4), ((2, 6, 7), 3), ((1, 32, 4, 4), 32)],
                         ids=["4d", "3d", "one_channel_groups"])
def test_group_norm_forward_and_gradients(graph_mode, shape, groups):
    """``layers.GroupNorm`` (fused statistics and affine, written-out backward): output and the input,
    weight and bias gradients as torch's, fp32; half inputs computed in fp32 and returned in half."""
    rng = np.random.default_rng(4)
    c = shape[1]
    x = (3 * rng.standard_normal(shape) + 1.5).astype(np.float32)  # a mean well off zero
    weight, bias = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
    w = rng.standard_normal(shape).astype(np.float32)
    tx, tweight, tbias = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    ty = torch.nn.functional.group_norm(tx, groups, tweight, tbias, eps=1e-6)
    (ty * torch.tensor(w)).sum().backward()

    fn = layers.GroupNormFn(groups, 1e-6)
    _close(fn(Tensor(x), Tensor(weight), Tensor(bias)).asnumpy(), ty.detach().numpy(), 1e-6, "y")
    grads = _Grads(fn)(Tensor(x), Tensor(weight), Tensor(bias), Tensor(w))[:3]
    for name, g, t in zip(("dx", "dweight", "dbias"), grads, (tx, tweight, tbias)):
        _close(g.asnumpy(), t.grad.numpy(), 1e-5, name)

    half = fn(Tensor(x, ms.float16), Tensor(weight), Tensor(bias))
    assert half.dtype == ms.float16
    ref = torch.nn.functional.group_norm(torch.tensor(x.astype(np.float16).astype(np.float32)), groups,
                                         tweight.detach(), tbias.detach(), eps=1e-6)
    _close(half.asnumpy().astype(np.float32), ref.numpy(), 1e-3, "fp16 y")
