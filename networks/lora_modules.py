"""The LoRA module that replaces a target Linear/Conv2d cell (kohya's ``LoRAModule`` /
``LoRAInfModule``), and the merged-delta math shared by merging and the tools.

The module owns the original layer's ``weight``/``bias`` Parameters (names kept) plus ``lora_down`` /
``lora_up`` cells and non-trainable ``alpha`` / ``multiplier`` Parameters, so that it compiles in graph
mode and a multiplier change does not recompile (see ``networks/lora.py``).
"""
import math

import numpy as np
from mindspore import Tensor, nn, ops

from library import layers
from networks.network_base import (  # noqa: F401  (the names the tools import from here)
    WrapsLayer, is_conv as _is_conv, is_linear as _is_linear, kernel as _kernel, param_numpy as _param_numpy,
    set_param as _set_param)


def _kaiming_uniform(shape, fan_in):
    """kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from the layers' seeded generator
    (also inside ``layers.skip_init()``: a zero lora_down would never train)."""
    bound = 1.0 / math.sqrt(fan_in)
    return layers._state["rng"].uniform(-bound, bound, size=shape).astype(np.float32)


# ---------------------------------------------------------------------------
# module


class LoRAModule(WrapsLayer, nn.Cell):
    """``y = org(x) + up(dropout(down(x))) * multiplier * alpha / dim``.

    Replaces ``org_module`` (a ``layers.Linear`` or ``layers.Conv2d``) in the
    model once applied; for Conv2d, ``lora_down`` has the original kernel,
    stride and padding and ``lora_up`` is 1x1. Dropout (``dropout`` on the
    rank activations, ``rank_dropout`` with the 1/(1-p) rescale,
    ``module_dropout`` of the whole LoRA term) only acts in training mode
    (``set_train(True)``).
    """

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1, dropout=None, rank_dropout=None,
                 module_dropout=None):
        super().__init__()
        self.read_layer(lora_name, org_module)
        in_dim, out_dim = self.in_dim, self.out_dim
        self.lora_dim = int(lora_dim)

        if self.is_conv:
            k = _kernel(org_module)
            self.kernel_size = k[0]
            self.lora_down = layers.Conv2d(in_dim, self.lora_dim, k[0], stride=org_module.stride,
                                           padding=org_module.padding, bias=False)
            self.lora_up = layers.Conv2d(self.lora_dim, out_dim, 1, bias=False)
            fan_in = in_dim * k[0] * k[1]
            self.conv = org_module.conv
            self.bias_add = ops.BiasAdd()
        else:
            self.kernel_size = None
            self.lora_down = layers.Linear(in_dim, self.lora_dim, bias=False)
            self.lora_up = layers.Linear(self.lora_dim, out_dim, bias=False)
            fan_in = in_dim
            self.bias_add = ops.BiasAdd()
            self.stored_dense = getattr(org_module, "stored_dense", None)
        self.lora_down.weight.set_data(Tensor(_kaiming_uniform(self.lora_down.weight.shape, fan_in)))
        self.lora_up.weight.set_data(Tensor(np.zeros(self.lora_up.weight.shape, np.float32)))

        self.scale = float(self.wrap_layer(org_module, alpha, multiplier)) / self.lora_dim
        self.dropout = None if dropout is None else float(dropout)
        self.rank_dropout = None if rank_dropout is None else float(rank_dropout)
        self.module_dropout = None if module_dropout is None else float(module_dropout)

    def construct(self, x):
        if self.is_conv:
            org = self.conv(x, self.weight)  # the layer's conv casts the weight to x's dtype
            if self.bias is not None:
                org = self.bias_add(org, self.bias.astype(x.dtype))
        else:
            org = layers.linear(x, self.weight, self.bias, self.bias_add, self.stored_dense)

        lx = self.lora_down(x)
        scale = self.alpha / self.lora_dim
        if self.training and self.dropout is not None:
            lx = ops.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout is not None:
            mask = (ops.rand((lx.shape[0], self.lora_dim)) > self.rank_dropout).astype(lx.dtype)
            if lx.ndim == 3:
                mask = mask.reshape(lx.shape[0], 1, self.lora_dim)  # text encoder / transformer tokens
            elif lx.ndim == 4:
                mask = mask.reshape(lx.shape[0], self.lora_dim, 1, 1)  # conv
            lx = lx * mask
            scale = scale * (1.0 / (1.0 - self.rank_dropout))  # as if the rank were changed
        lx = self.lora_up(lx)
        lx = lx * (self.multiplier * scale).astype(lx.dtype)
        if self.training and self.module_dropout is not None:
            keep = (ops.rand((1,)) >= self.module_dropout).astype(lx.dtype)
            lx = lx * keep
        return org + lx

    # -- weights -------------------------------------------------------------

    def get_weight(self, multiplier=None, up=None, down=None, alpha=None):
        """The merged delta ``multiplier * up@down * alpha/dim`` (fp32 numpy, the original weight's shape)."""
        up = self.lora_up.weight.asnumpy() if up is None else up
        down = self.lora_down.weight.asnumpy() if down is None else down
        alpha = float(self.alpha.asnumpy()) if alpha is None else alpha
        multiplier = float(self.multiplier.asnumpy()) if multiplier is None else multiplier
        return lora_delta(up, down, alpha, multiplier)

    def set_multiplier(self, multiplier):
        self.multiplier.set_data(Tensor(np.float32(multiplier)))

    # -- what networks.network_base asks of a module --------------------------------

    PLUS_LEAVES = ("lora_up.weight",)  # LoRA+ (kohya): lora_up trains with lr * ratio

    def trainable_weights(self):
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}

    @staticmethod
    def merged_shape(sd):
        up, down = np.shape(sd["lora_up.weight"]), np.shape(sd["lora_down.weight"])
        return (up[0], down[1]) + tuple(down[2:])

    @staticmethod
    def delta_from(sd, multiplier):
        alpha = float(np.asarray(sd["alpha"], np.float32).reshape(-1)[0]) if "alpha" in sd else None
        return lora_delta(sd["lora_up.weight"], sd["lora_down.weight"], alpha, multiplier)

    def max_norm_scale(self, max_norm_value):
        """kohya's max-norm step on ``up@down*scale``: up and down each scaled by sqrt(ratio)."""
        down = _param_numpy(self.lora_down.weight).astype(np.float32)
        up = _param_numpy(self.lora_up.weight).astype(np.float32)
        updown = lora_delta(up, down, float(self.alpha.asnumpy()), 1.0)
        norm = max(float(np.linalg.norm(updown)), max_norm_value / 2)
        desired = min(norm, max_norm_value)
        ratio = desired / norm
        if ratio != 1:
            s = np.float32(ratio ** 0.5)
            _set_param(self.lora_up.weight, up * s)
            _set_param(self.lora_down.weight, down * s)
        return ratio != 1, float(np.linalg.norm(updown)) * ratio


class LoRAInfModule(LoRAModule):
    """Inference variant (kohya): no dropout; used by ``create_network_from_weights(for_inference=True)``."""

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1, **kwargs):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha)

    def merge_to(self, sd, dtype=None, device=None):
        """Add ``multiplier * up@down * scale`` to the original weight (kohya ``LoRAInfModule.merge_to``)."""
        new = self._merged_weight(sd)
        _set_param(self.org_module.weight, new, dtype)

    def _merged_weight(self, sd):
        up = np.asarray(sd["lora_up.weight"], np.float32)
        down = np.asarray(sd["lora_down.weight"], np.float32)
        alpha = float(np.asarray(sd["alpha"], np.float32)) if "alpha" in sd else float(self.alpha.asnumpy())
        weight = _param_numpy(self.org_module.weight).astype(np.float32)
        return weight + lora_delta(up, down, alpha, float(self.multiplier.asnumpy()))


def lora_delta(up, down, alpha, multiplier=1.0):
    """``multiplier * alpha/dim * up@down`` for Linear (2-D), conv 1x1 and conv kxk (down kxk, up 1x1)."""
    up = np.asarray(up, np.float32)
    down = np.asarray(down, np.float32)
    dim = down.shape[0]
    alpha = dim if alpha is None or alpha == 0 else alpha
    scale = np.float32(alpha / dim)
    if down.ndim == 2:
        w = up @ down
    elif down.shape[2:4] == (1, 1):
        w = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    else:
        # conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3) in kohya: sum over the rank
        w = np.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    return (np.float32(multiplier) * w * scale).astype(np.float32)
