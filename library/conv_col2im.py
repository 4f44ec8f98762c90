"""Convolutions (kernel > 1) as one matmul and ``Col2Im``, for a CPU whose oneDNN ISA is not capped.

On AVX-512 CPUs oneDNN runs 3x3 convolutions and their input gradient on a reference kernel; capping
its ISA at AVX2 (the default, ``library.device_utils``) restores the fast kernel but halves every fp32
matmul. With the cap lifted (``ONEDNN_MAX_CPU_ISA=ALL``), ``layers.Conv2d`` uses this cell instead:

forward:  y = Col2Im(Wf @ x) with Wf[(o, k), i] = W[o, i, flip(k)]: the transposed convolution with the
          kernel flipped (and padding kernel-1-p) is the convolution; stride 2 is the stride-1 result
          subsampled. The columns are kernel-area x the output, so large outputs (the VAE at 1024x1024)
          run in bands of rows that keep them under ``BAND_BYTES``.
backward: dx = Col2Im(W(o, i*k*k)^T @ dy) with the convolution's stride and padding (W as stored: no
          flip, no transpose); dW (LoRA's own convolutions) is Conv2DBackpropFilter, pruned for frozen W.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.operations import _grad_ops as G

from library.weight_cast import backward_cast, cast_weight

BAND_BYTES = 256 * 2 ** 20


class Conv2dCol(nn.Cell):
    """``conv(x, weight)`` (square kernel, symmetric zero padding, groups=1) in x's dtype."""

    def __init__(self, out_channels, kernel_size, padding, stride):
        super().__init__()
        self.k = kernel_size
        self.padding = padding
        self.stride = stride
        self.per_use_cast = True
        self.band_bytes = BAND_BYTES
        kk = kernel_size * kernel_size
        self.flip = ms.Tensor(np.eye(kk, dtype=np.float32)[::-1].copy())
        self.col2im = ops.Col2Im(kernel_size=kernel_size, dilation=1, padding=kernel_size - 1 - padding, stride=1)
        # a band's input rows come padded already: "valid" along the height
        self.col2im_band = ops.Col2Im(kernel_size=kernel_size, dilation=1,
                                      padding=(kernel_size - 1, kernel_size - 1 - padding), stride=1)
        self.col2im_dx = ops.Col2Im(kernel_size=kernel_size, dilation=1, padding=padding, stride=stride)
        self.mm_ta = ops.MatMul(transpose_a=True)
        self.conv_weight_grad = G.Conv2DBackpropFilter(out_channels, kernel_size, pad_mode="pad", pad=padding,
                                                       pad_list=(padding,) * 4, stride=stride)

    def _flipped(self, w):
        """W (o, i, k, k) -> (o * k*k, i) with the kernel positions reversed (a permutation matmul: exact,
        and faster than MindSpore's CPU ReverseV2)."""
        o, i = w.shape[0], w.shape[1]
        kk = self.k * self.k
        f = ops.matmul(w.reshape(o * i, kk), self.flip.astype(w.dtype))
        return f.reshape(o, i, kk).transpose(0, 2, 1).reshape(o * kk, i)

    def _band_rows(self, out_channels, height, width, itemsize):
        """Output rows per band (the stride-1 output), a multiple of the stride."""
        per_row = out_channels * self.k * self.k * width * itemsize
        rows = max(1, self.band_bytes // per_row)
        if rows >= height:
            return height
        return max(self.stride, rows - rows % self.stride)

    def _conv_stride1(self, wf, xb, o, oh, ow):
        c, h, wd = xb.shape
        z = ops.matmul(wf, xb.reshape(c, h * wd))
        return self.col2im(z.reshape(1, o, self.k * self.k, h * wd), ms.Tensor([oh, ow], ms.int32))

    def _conv_bands(self, wf, xp, o, oh, ow, rows):
        """Stride-1 output rows in bands; ``xp`` is padded along the height."""
        c, wd = xp.shape[0], xp.shape[2]
        bands = []
        for r0 in range(0, oh, rows):
            r1 = min(oh, r0 + rows)
            hb = r1 - r0 + self.k - 1
            z = ops.matmul(wf, xp[:, r0:r0 + hb].reshape(c, hb * wd))
            y = self.col2im_band(z.reshape(1, o, self.k * self.k, hb * wd), ms.Tensor([r1 - r0, ow], ms.int32))
            if self.stride != 1:
                y = y[:, :, ::self.stride, ::self.stride]
            bands.append(y)
        return ops.concat(bands, 2)

    def construct(self, x, weight):
        w = cast_weight(weight, x, self.per_use_cast)
        n, _, h, wd = x.shape
        o = w.shape[0]
        p = self.padding
        oh, ow = h + 2 * p - self.k + 1, wd + 2 * p - self.k + 1
        wf = self._flipped(w)
        rows = self._band_rows(o, oh, ow, 4 if x.dtype == ms.float32 else 2)
        ys = []
        for b in range(n):
            if rows >= oh:
                y = self._conv_stride1(wf, x[b], o, oh, ow)
                if self.stride != 1:
                    y = y[:, :, ::self.stride, ::self.stride]
            else:
                xp = ops.pad(x[b], (0, 0, p, p)) if p else x[b]
                y = self._conv_bands(wf, xp, o, oh, ow, rows)
            ys.append(y)
        return ys[0] if n == 1 else ops.concat(ys, 0)

    def bprop(self, x, weight, out, dout):
        w = backward_cast(weight, dout, self.per_use_cast)
        n, c, h, wd = x.shape
        o = w.shape[0]
        ho, wo = dout.shape[2], dout.shape[3]
        dxs = []
        for b in range(n):
            z = self.mm_ta(w.reshape(o, -1), dout[b].reshape(o, ho * wo))
            dxs.append(self.col2im_dx(z.reshape(1, c, self.k * self.k, ho * wo), ms.Tensor([h, wd], ms.int32)))
        dx = dxs[0] if n == 1 else ops.concat(dxs, 0)
        return dx, self.conv_weight_grad(dout, x, weight.shape).astype(weight.dtype)
