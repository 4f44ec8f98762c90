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


class ScaledDotProductAttention(nn.Cell):
    """Multi-head attention core on projected inputs: (B,N,H*D), (B,M,H*D), (B,M,H*D) -> (B,N,H*D)."""

    def __init__(self, heads: int, impl: str = "plain", chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.heads = heads
        self.impl = check_attention_impl(impl)
        self.chunk_size = int(chunk_size)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)

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

    def _softmax_attend(self, q, k, v):
        # q (B,H,n,D) already scaled, k/v (B,H,M,D)
        scores = self.bmm_t(q, k)
        if scores.dtype == ms.float32:
            probs = ops.softmax(scores, -1)
        else:
            probs = ops.softmax(scores.astype(ms.float32), -1).astype(v.dtype)
        return self.bmm(probs, v)

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
                    outs = outs + (self._softmax_attend(q[:, :, start:stop], k, v),)
                return self._merge_heads(ops.concat(outs, 2))
        return self._merge_heads(self._softmax_attend(q, k, v))

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
