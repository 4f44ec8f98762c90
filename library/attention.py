"""Scaled dot-product attention with a selectable implementation.

One cell, ``ScaledDotProductAttention``, takes already projected ``q`` (B, N, H*D)
and ``k``/``v`` (B, M, H*D) and returns (B, N, H*D), softmax(q k^T / sqrt(D)) v
per head. The implementation is chosen per cell (``impl``):

``"plain"``
    batch matmul + softmax over the full (B, H, N, M) score tensor.
``"chunked"``
    the same maths over blocks of ``chunk_size`` queries, so only a
    (B, H, chunk, M) score block lives at a time in the forward pass. This is
    what lets 1024x1024 inference (VAE mid-block attention over 128x128 = 16384
    tokens: 1 GiB of fp32 scores per head unchunked) fit in CPU memory. The
    loop is unrolled at compile time, so it needs static sequence lengths.
    In training the autodiff still keeps every block's probabilities for the
    backward pass; combine with gradient checkpointing to bound that.
``"flash"``
    ``ops.flash_attention_score`` (Ascend only: selecting it on another device
    raises ``ValueError``). fp32 inputs are cast to fp16 for the kernel.

Half-precision inputs are softmaxed in fp32 (torch's ``upcast_softmax``
behaviour), everything else stays in the input dtype.

The implementation is read when the graph is compiled: set it before the first
call of a graph-mode network (a compiled graph is not rebuilt when it changes).
"""
import math

import mindspore as ms
from mindspore import nn, ops

ATTENTION_IMPLS = ("plain", "chunked", "flash")
DEFAULT_CHUNK_SIZE = 1024


def check_attention_impl(impl: str) -> str:
    """Validate an implementation name for the current device target; returns it."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation '{impl}': choose one of {', '.join(ATTENTION_IMPLS)}")
    if impl == "flash":
        target = ms.get_context("device_target")
        if target != "Ascend":
            raise ValueError(
                f"attention implementation 'flash' needs an Ascend device (ops.flash_attention_score), "
                f"but the device target is {target}: use 'plain' or 'chunked' there")
    return impl


# kohya's attention flags in kohya's order of precedence (``replace_unet_modules``: mem_eff_attn, then
# xformers, then sdpa), then this port's --flash_attn: flag -> (implementation on Ascend, elsewhere).
# They all ask for attention that does not hold the full score tensor: on Ascend that is the flash kernel;
# on the CPU xformers and kohya's own mem_eff_attn become the chunked implementation, and torch's sdpa
# (which computes exact attention) the plain one, which is also the fastest there.
KOHYA_ATTENTION_FLAGS = {
    "mem_eff_attn": ("chunked", "chunked"),
    "xformers": ("flash", "chunked"),
    "sdpa": ("flash", "plain"),
    "flash_attn": ("flash", "flash"),
}


def attention_impl_for_flags(flags: dict, target: str):
    """The implementation the first set flag of ``KOHYA_ATTENTION_FLAGS`` asks for on ``target``
    ("Ascend", "CPU", ...), or None when none is set (keep the default)."""
    for flag, (ascend, elsewhere) in KOHYA_ATTENTION_FLAGS.items():
        if flags.get(flag):
            return ascend if target == "Ascend" else elsewhere
    return None


class SoftmaxAttend(nn.Cell):
    """softmax(q k^T) v per head on (B, H, N, D) inputs, q already scaled.

    The backward is written out and recomputes the probabilities from q and k
    (as memory-efficient attention kernels do), so the training graph keeps
    only q, k and v per attention, not the (B, H, N, M) scores. With the
    primitives' own backward the CPU graph backend kept about five score-sized
    buffers per attention until the end of the step (the softmax backward's
    implicitly broadcast row sum is never freed there; Limitations.md has the
    figures). The price is one more q k^T and
    softmax per attention backward.
    """

    def __init__(self):
        super().__init__()
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm_ta = ops.BatchMatMul(transpose_a=True)
        self.softmax = ops.Softmax(-1)

    def _probs(self, q, k):
        scores = self.bmm_t(q, k)
        if scores.dtype == ms.float32:
            return self.softmax(scores)
        return self.softmax(scores.astype(ms.float32))  # fp32 softmax for half inputs (torch's upcast)

    def construct(self, q, k, v):
        return self.bmm(self._probs(q, k).astype(v.dtype), v)

    def bprop(self, q, k, v, out, dout):
        # depend on dout: otherwise the graph merges this with the forward's
        # identical q k^T / softmax and keeps the forward's scores for the backward
        probs = self._probs(ops.depend(q, dout), k)  # fp32 for half inputs
        dv = self.bmm_ta(probs.astype(v.dtype), dout)
        # softmax backward: dscores = P * (dP - rowsum(P * dP)), dP = dout v^T, and
        # rowsum(P * dP) = rowsum(dout * out). The row term rides along as one more
        # column of the dP matmul, [dout, -row] [v, 1]^T: no broadcast op at all.
        dout32 = dout.astype(ms.float32)
        row = (dout32 * out.astype(ms.float32)).sum(-1, keepdims=True)
        lhs = ops.concat((dout32, -row), -1)
        rhs = ops.concat((v.astype(ms.float32), ops.ones(v.shape[:-1] + (1,), ms.float32)), -1)
        dscores = (probs * self.bmm_t(lhs, rhs)).astype(q.dtype)
        return self.bmm(dscores, k), self.bmm_ta(dscores, q), dv


class ScaledDotProductAttention(nn.Cell):
    """Multi-head attention core on projected inputs: (B,N,H*D), (B,M,H*D), (B,M,H*D) -> (B,N,H*D)."""

    def __init__(self, heads: int, impl: str = "plain", chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.heads = heads
        self.impl = check_attention_impl(impl)
        self.chunk_size = int(chunk_size)
        self.attend = SoftmaxAttend()

    def set_impl(self, impl: str, chunk_size=None):
        self.impl = check_attention_impl(impl)
        if chunk_size is not None:
            if int(chunk_size) < 1:
                raise ValueError(f"attention chunk size must be positive, got {chunk_size}")
            self.chunk_size = int(chunk_size)

    def _split_heads(self, t):
        b, n, hd = t.shape
        return t.reshape(b, n, self.heads, hd // self.heads).transpose(0, 2, 1, 3)

    def _merge_heads(self, t):
        b, h, n, d = t.shape
        return t.transpose(0, 2, 1, 3).reshape(b, n, h * d)

    def construct(self, q, k, v):
        if self.impl == "flash":
            return self._flash(q, k, v)
        head_dim = q.shape[-1] // self.heads
        scale = 1.0 / math.sqrt(head_dim)
        q = self._split_heads(q) * scale
        k = self._split_heads(k)
        v = self._split_heads(v)
        if self.impl == "chunked":
            n = q.shape[2]
            if n > self.chunk_size:
                outs = ()
                for start in range(0, n, self.chunk_size):
                    stop = min(start + self.chunk_size, n)
                    outs = outs + (self.attend(q[:, :, start:stop], k, v),)
                return self._merge_heads(ops.concat(outs, 2))
        return self._merge_heads(self.attend(q, k, v))

    def _flash(self, q, k, v):
        dtype = q.dtype
        if dtype == ms.float32:
            q = q.astype(ms.float16)
            k = k.astype(ms.float16)
            v = v.astype(ms.float16)
        head_dim = q.shape[-1] // self.heads
        out = ops.flash_attention_score(q, k, v, self.heads, scalar_value=1.0 / math.sqrt(head_dim),
                                        input_layout="BSH")
        return out.astype(dtype)
