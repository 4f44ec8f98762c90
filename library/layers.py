"""Basic layers with torch's parameter names and initialisation, built only from
MindSpore ops that have CPU kernels in graph and PyNative mode.

``mindspore.nn`` names norm parameters ``gamma``/``beta`` and ``mint`` layers
have no CPU kernels (LayerNormExt, Conv2DExt, GeluExt), so the models here use
these cells: parameter names then match the torch state dicts one to one
(``weight``/``bias``) and checkpoints map without renaming tables.

Initialisation follows torch's defaults (kaiming-uniform a=sqrt(5) for
weights, uniform(+-1/sqrt(fan_in)) for biases) from a numpy generator seeded
by ``set_init_seed``; inside ``skip_init()`` parameters are zeros allocated on
first use, for full-size models whose weights are loaded afterwards.
"""
import contextlib
import math
import time

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer
from mindspore.ops.operations import _grad_ops as G

from library.conv_col2im import Conv2dCol
from library.device_utils import conv_as_matmul
from library.weight_cast import backward_cast, cast_weight

_state = {"rng": np.random.default_rng(0), "skip": False}


def set_init_seed(seed: int):
    _state["rng"] = np.random.default_rng(seed)


@contextlib.contextmanager
def skip_init():
    """Allocate parameters as zeros (no random init) inside this block."""
    prev = _state["skip"]
    _state["skip"] = True
    try:
        yield
    finally:
        _state["skip"] = prev


def _param(shape, bound=None, fill=None, name=None):
    if _state["skip"]:  # allocated when first used or cast (weights loaded into another dtype never exist in fp32)
        return Parameter(initializer("zeros", shape, ms.float32), name=name)
    if fill is not None:
        data = np.full(shape, fill, np.float32)
    else:
        data = _state["rng"].uniform(-bound, bound, size=shape).astype(np.float32)
    return Parameter(Tensor(data), name=name)


def _uniform_bound(fan_in):
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


class Linear(nn.Cell):
    """torch.nn.Linear: weight (out, in), y = x @ W.T + b."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        bound = _uniform_bound(in_features)  # kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))
        self.weight = _param((out_features, in_features), bound, name="weight")
        self.bias = _param((out_features,), bound, name="bias") if bias else None

        self.bias_add = ops.BiasAdd()
        self.stored_dense = StoredDense()  # used when the weight is stored in another dtype than the input

    def construct(self, x):
        return linear(x, self.weight, self.bias, self.bias_add, self.stored_dense)


def linear(x, weight, bias, bias_add, stored_dense=None):
    """x @ W.T + b in x's dtype (graph-mode friendly; ``bias_add`` is an ``ops.BiasAdd``).

    The bias goes through BiasAdd on the 2-D view, not dense's broadcast add:
    the CPU graph backend does not reuse the memory of implicitly broadcasting
    binary ops (Limitations.md, "broadcasting binary ops").
    A weight stored in another dtype than x goes through ``stored_dense`` when given.
    """
    if weight.dtype != x.dtype and stored_dense is not None:
        y = stored_dense(x, weight)
    else:
        y = ops.dense(x, cast_weight(weight, x))
    if bias is None:
        return y
    shape = y.shape
    return bias_add(y.reshape(-1, shape[-1]), bias.astype(x.dtype)).reshape(shape)


class StoredDense(nn.Cell):
    """``ops.dense(x, weight)`` computed in x's dtype for a weight stored in another (half) precision.

    In a one-graph step the backward casts the weight again instead of keeping the forward's cast: with
    autodiff's own backward every frozen fp16 weight's fp32 copy stays alive until its layer's backward,
    so fp16 storage would cost 1.5x the fp32 weights' memory instead of half of it. With
    ``per_use_cast`` off (``short_graph_forms``) both casts are the same expression, computed once.
    """

    def __init__(self):
        super().__init__()
        self.per_use_cast = True

    def construct(self, x, weight):
        return ops.dense(x, cast_weight(weight, x, self.per_use_cast))

    def bprop(self, x, weight, out, dout):
        w = backward_cast(weight, dout, self.per_use_cast)
        d2 = dout.reshape(-1, dout.shape[-1])
        dx = ops.matmul(d2, w).reshape(x.shape)
        dw = ops.matmul(d2.T, x.reshape(-1, x.shape[-1])).astype(weight.dtype)  # pruned for frozen weights
        return dx, dw


class Conv2d(nn.Cell):
    """torch.nn.Conv2d (square kernel, symmetric zero padding, groups=1)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        bound = _uniform_bound(in_channels * kernel_size * kernel_size)
        self.weight = _param((out_channels, in_channels, kernel_size, kernel_size), bound, name="weight")
        self.bias = _param((out_channels,), bound, name="bias") if bias else None
        if kernel_size > 1 and conv_as_matmul():
            self.conv = Conv2dCol(out_channels, kernel_size, padding, stride)
        elif stride == 1:
            self.conv = Conv2dStride1(in_channels, out_channels, kernel_size, padding)
        else:
            self.conv = Conv2dCast(out_channels, kernel_size, padding, stride)
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        y = self.conv(x, self.weight)
        if self.bias is not None:
            y = self.bias_add(y, self.bias.astype(x.dtype))
        return y


class Conv2dCast(nn.Cell):
    """``ops.Conv2D`` called as ``conv(x, weight)`` in x's dtype (the weight is cast to it)."""

    def __init__(self, out_channels, kernel_size, padding, stride):
        super().__init__()
        self.per_use_cast = True
        self.conv = ops.Conv2D(out_channels, kernel_size, pad_mode="pad", pad=padding, stride=stride)

    def construct(self, x, weight):
        return self.conv(x, cast_weight(weight, x, self.per_use_cast))


class Conv2dStride1(nn.Cell):
    """``ops.Conv2D`` (stride 1, zero padding) called as ``conv(x, weight)`` in x's dtype, backward
    written out.

    Two forms, chosen per cell (``short_graph_forms`` picks the second):
    - for a one-graph step: the input gradient is the forward convolution of ``dout`` with the
      flipped, in/out-swapped kernel (Conv2DBackpropInput keeps a buffer of about kernel-area x the
      input alive until its graph ends on the CPU graph backend: in a one-graph step, one per frozen 3x3
      convolution for the whole step, ``tests/test_graph_memory.py``); a weight stored in another dtype
      than x (fp16 frozen weights, fp32 compute) is cast in the forward and again in the backward, so
      the cast copy is not kept between them;
    - ``backprop_input`` and not ``per_use_cast``, for graphs that hold a few layers: Conv2DBackpropInput
      (several times faster: the kernel flip is a slow ReverseV2 on the CPU) and one cast per graph.
    The weight gradient (LoRA's own convolutions) is Conv2DBackpropFilter, as in the primitive's
    backward; for frozen weights it is pruned from the graph.
    """

    def __init__(self, in_channels, out_channels, kernel_size, padding):
        super().__init__()
        self.backprop_input = False
        self.per_use_cast = True
        self.conv = ops.Conv2D(out_channels, kernel_size, pad_mode="pad", pad=padding)
        self.conv_flipped = ops.Conv2D(in_channels, kernel_size, pad_mode="pad", pad=kernel_size - 1 - padding)
        self.conv_input_grad = ops.Conv2DBackpropInput(out_channels, kernel_size, pad_mode="pad", pad=padding,
                                                       pad_list=(padding,) * 4)
        self.conv_weight_grad = G.Conv2DBackpropFilter(out_channels, kernel_size, pad_mode="pad", pad=padding,
                                                       pad_list=(padding,) * 4)

    def construct(self, x, weight):
        return self.conv(x, cast_weight(weight, x, self.per_use_cast))

    def bprop(self, x, weight, out, dout):
        kernel = backward_cast(weight, dout, self.per_use_cast)
        if self.backprop_input:
            dx = self.conv_input_grad(dout, kernel, x.shape)
        else:
            dx = self.conv_flipped(dout, ops.flip(kernel, (2, 3)).transpose(1, 0, 2, 3))
        return dx, self.conv_weight_grad(dout, x, weight.shape).astype(weight.dtype)


def short_graph_forms(cell: nn.Cell):
    """Every layer in ``cell`` switches to the forms that are faster when a graph holds only a few
    layers (``library.unet_segments``): their extra buffers (a conv's input-gradient workspace, a weight's
    cast copy shared by forward and backward) then live only as long as that small graph."""
    for _, sub in cell.cells_and_names():
        if isinstance(sub, Conv2dStride1):
            sub.backprop_input = True
        if isinstance(sub, (Conv2dStride1, Conv2dCast, Conv2dCol, StoredDense)):
            sub.per_use_cast = False


class LayerNorm(nn.Cell):
    """torch.nn.LayerNorm over the last dimension."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = _param((normalized_shape,), fill=1.0, name="weight")
        self.bias = _param((normalized_shape,), fill=0.0, name="bias")
        self.weight.requires_grad = elementwise_affine
        self.bias.requires_grad = elementwise_affine
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        if x.dtype == ms.float32:
            return self.norm(x, self.weight, self.bias)[0]
        # statistics in fp32 for half inputs, as torch autocast does
        return self.norm(x.astype(ms.float32), self.weight, self.bias)[0].astype(x.dtype)


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm for NC... inputs; statistics computed in fp32 (``GroupNormFn``)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.weight = _param((num_channels,), fill=1.0, name="weight")
        self.bias = _param((num_channels,), fill=0.0, name="bias")
        self.weight.requires_grad = affine
        self.bias.requires_grad = affine
        self.fn = GroupNormFn(num_groups, eps)

    def construct(self, x):
        return self.fn(x, self.weight, self.bias)


class GroupNormFn(nn.Cell):
    """``fn(x, weight, bias)``: group normalisation of NC... ``x`` in fp32, returned in x's dtype.

    Forward as two fused CPU kernels: ``LayerNorm`` over each group of the (N*G, ...) view gives the
    group means and variances, and ``BatchNorm`` in inference form on the (1, N*C, ...) view applies
    each (sample, channel)'s mean, variance, weight and bias in one pass; written out elementwise the
    same formula is several times slower on CPU (Limitations.md). The backward is written out
    too (torch's formula): it recomputes the statistics, so nothing but the input is kept for it, and
    every broadcast is explicit (``ops.broadcast_to``): the CPU graph backend does not reuse the memory
    of binary ops that broadcast implicitly (Limitations.md).
    """

    def __init__(self, num_groups, eps):
        super().__init__()
        self.groups = num_groups
        self.eps = eps
        self.group_stats = ops.LayerNorm(begin_norm_axis=1, begin_params_axis=-1, epsilon=eps)
        self.channel_affine = ops.BatchNorm(is_training=False, epsilon=eps)
        # primitive instances and constants, not functional ops or Tensor methods: those compiled inside
        # this bprop left MindSpore's cached-primitive graph empty for the other bprops of a segment graph
        self.row_mean = ops.ReduceMean(keep_dims=True)
        self.channel_sum = ops.ReduceSum()
        self.tile = ops.Tile()
        self.rsqrt = ops.Rsqrt()
        self.one = Tensor(np.ones(1, np.float32))
        self.zero = Tensor(np.zeros(1, np.float32))

    def _normalized(self, x32):
        """(x normalised per group in the (N*G, D) view, group means (N*G,), group variances (N*G,))."""
        rows = x32.shape[0] * self.groups
        h, mean, var = self.group_stats(x32.reshape(rows, -1, 1), self.one, self.zero)
        return h.reshape(rows, -1), mean.reshape(-1), var.reshape(-1)

    def _per_channel(self, stat, n, c):
        """(N*G,) group values -> (N*C,) values of each (sample, channel)."""
        g = self.groups
        return ops.broadcast_to(stat.reshape(n, g, 1), (n, g, c // g)).reshape(-1)

    def construct(self, x, weight, bias):
        shape = x.shape
        n, c = shape[0], shape[1]
        x32 = x.astype(ms.float32)
        _, mean, var = self._normalized(x32)
        y = self.channel_affine(x32.reshape(1, n * c, -1, 1), self.tile(weight.astype(ms.float32), (n,)),
                                self.tile(bias.astype(ms.float32), (n,)), self._per_channel(mean, n, c),
                                self._per_channel(var, n, c))[0]
        return y.reshape(shape).astype(x.dtype)

    def bprop(self, x, weight, bias, out, dout):
        shape = x.shape
        n, c = shape[0], shape[1]
        xhat, _, var = self._normalized(x.astype(ms.float32))
        rows = xhat.shape[0]
        d32 = dout.astype(ms.float32).reshape(n, c, -1)
        xc = xhat.reshape(n, c, -1)
        db = self.channel_sum(d32, (0, 2))
        dw = self.channel_sum(d32 * xc, (0, 2))
        # dxhat = dout * weight; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) per group
        g = (d32 * ops.broadcast_to(weight.astype(ms.float32).reshape(1, c, 1), d32.shape)).reshape(rows, -1)
        m1 = ops.broadcast_to(self.row_mean(g, -1), g.shape)
        m2 = ops.broadcast_to(self.row_mean(g * xhat, -1), g.shape)
        rstd = ops.broadcast_to(self.rsqrt(var + self.eps).reshape(rows, 1), g.shape)
        dx = (g - m1 - xhat * m2) * rstd
        return dx.reshape(shape).astype(x.dtype), dw.astype(weight.dtype), db.astype(bias.dtype)


class Embedding(nn.Cell):
    """torch.nn.Embedding: weight (num, dim), init N(0, 1) as torch."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        if _state["skip"]:
            self.weight = _param((num_embeddings, embedding_dim), name="weight")
        else:
            data = _state["rng"].standard_normal((num_embeddings, embedding_dim)).astype(np.float32)
            self.weight = Parameter(Tensor(data), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


def upsample_nearest2x(x):
    """Nearest-neighbour x2 upsampling of (B, C, H, W) by broadcasting: exact, differentiable, and
    without a resize kernel (MindSpore's CPU ``ResizeNearestNeighbor`` is the slower of the two)."""
    b, c, h, w = x.shape
    return ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, h * 2, w * 2)


class SiLU(nn.Cell):
    def construct(self, x):
        return ops.silu(x)


class GELU(nn.Cell):
    """Exact (erf) GELU as torch.nn.GELU(); ``approximate='tanh'`` for the tanh form.

    ``ops.GeLU`` is the tanh approximation (4.7e-4 off erf). The exact form is
    written out as 0.5 x (1 + erf(x / sqrt 2)) rather than
    ``ops.gelu(approximate='none')``: same values, but the latter's graph-mode
    CPU kernels keep ~4 extra activation-sized buffers per call alive.
    """

    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def construct(self, x):
        if self.approximate == "tanh":
            return ops.gelu(x, approximate="tanh")
        return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


class QuickGELU(nn.Cell):
    """x * sigmoid(1.702 x): CLIP ViT-L's activation (transformers ``quick_gelu``)."""

    def construct(self, x):
        return x * ops.sigmoid(1.702 * x)


class Identity(nn.Cell):
    def construct(self, x):
        return x


def recompile_on_next_call(root: nn.Cell):
    """Every cell under ``root`` compiles afresh on its next call. Graph mode caches compiled graphs by
    (cell id, creation time, input signature); a change the key does not see (parameter dtypes, cells
    swapped in) would otherwise keep running the old graph. A new creation time changes the key."""
    stamp = time.time_ns()
    for _, cell in root.cells_and_names():
        object.__setattr__(cell, "_create_time", stamp)


def param_dict(cell: nn.Cell):
    """Name -> numpy array of a cell's parameters (names as in torch state dicts)."""
    return {p.name: p.asnumpy() for p in cell.get_parameters()}


def load_param_dict(cell: nn.Cell, arrays, strict=True):
    """Copy numpy arrays into a cell's parameters by name, checking shapes.

    Returns (missing, unexpected) name lists; raises ValueError when ``strict``
    and any differ, or on a shape mismatch.
    """
    params = {p.name: p for p in cell.get_parameters()}
    missing = sorted(set(params) - set(arrays))
    unexpected = sorted(set(arrays) - set(params))
    if strict and (missing or unexpected):
        raise ValueError(
            f"state dict does not fit the model: {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}")
    for name, p in params.items():
        if name not in arrays:
            continue
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"shape mismatch for {name}: file {tuple(value.shape)}, model {tuple(p.shape)}")
        p.set_data(Tensor(value.astype(ms.dtype_to_nptype(p.dtype), copy=False)))
    return missing, unexpected
