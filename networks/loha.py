"""LoHa (LyCORIS's low-rank Hadamard product adapter) for SDXL, in LyCORIS's file format:
``--network_module networks.loha``.

A module replaces a Linear/Conv2d as ``networks.lora``'s do and adds ``multiplier * ΔW`` applied to the
input, with

    ΔW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / dim

(``*`` elementwise). ``hada_w1_a``/``hada_w2_a`` are (out, dim), ``hada_w1_b``/``hada_w2_b`` are
(dim, in) for a Linear and (dim, in*kh*kw) for a conv, whose ΔW is reshaped to (out, in, kh, kw). As in
LyCORIS, ``hada_w1_a`` starts normal(0, 0.1), both ``_b`` normal(0, 1) and ``hada_w2_a`` zero, so ΔW
starts at 0 and every factor still gets a gradient.

Files hold ``<kohya module name>.hada_w1_a`` / ``.hada_w1_b`` / ``.hada_w2_a`` / ``.hada_w2_b`` /
``.alpha``, the keys LyCORIS writes and ComfyUI, A1111/Forge and LyCORIS read. The layers are kohya's
``networks.lora`` targets (attention and MLP Linears and 1x1 convs with ``--network_dim``; the
ResNet/down/upsample blocks' convs only with ``conv_dim``, their 3x3 convs with ``conv_dim``).

``network_args`` (LyCORIS's names): ``algo=loha`` (optional), ``conv_dim``, ``conv_alpha``,
``rank_dropout`` (zeroes rows of ΔW, as LyCORIS), ``module_dropout`` (skips the whole module);
``dropout`` only as 0 (LyCORIS's LoHa does not implement it). What else LyCORIS offers is refused with
one line (see Limitations.md).
"""
import logging
from collections import OrderedDict
from typing import Optional

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from library import layers
from library.device_utils import UserError
from networks.network_base import (
    NetworkBase, WrapsLayer, float_arg, is_linear, is_sdxl_unet, kernel, param_numpy, parse_network_args, set_param)

logger = logging.getLogger(__name__)

LEAVES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

KNOWN_NETWORK_ARGS = {"algo", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout"}
# LyCORIS options that change the file or the math; refused rather than ignored
LYCORIS_ONLY_ARGS = {"use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "use_scalar", "dora_wd",
                     "wd_on_output", "rs_lora", "bypass_mode", "train_norm", "preset", "factor", "block_size",
                     "constraint", "rescaled", "rank_dropout_scale", "full_matrix", "decompose_both"}


def hada_delta(w1a, w1b, w2a, w2b, alpha, multiplier=1.0):
    """``multiplier * (w1a@w1b) * (w2a@w2b) * alpha/dim`` as fp32 numpy, (out, in*kh*kw)."""
    w1a, w1b, w2a, w2b = (np.asarray(w, np.float32) for w in (w1a, w1b, w2a, w2b))
    dim = w1b.shape[0]
    alpha = dim if alpha is None or alpha == 0 else alpha
    return ((w1a @ w1b) * (w2a @ w2b) * np.float32(alpha / dim * multiplier)).astype(np.float32)


class LoHaModule(WrapsLayer, nn.Cell):
    """``y = org(x) + op(x, multiplier * ΔW)`` (op: the layer's dense or conv, its stride and padding)."""

    PLUS_LEAVES = ()  # LoRA+ is not offered for LoHa

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1, dropout=None, rank_dropout=None,
                 module_dropout=None):
        super().__init__()
        self.read_layer(lora_name, org_module)
        if self.is_conv:
            k = kernel(org_module)
            flat_in = self.in_dim * k[0] * k[1]
            self.delta_shape = (self.out_dim, self.in_dim, k[0], k[1])
            self.conv = org_module.conv
        else:
            flat_in = self.in_dim
            self.delta_shape = (self.out_dim, self.in_dim)
            self.stored_dense = getattr(org_module, "stored_dense", None)
        self.bias_add = ops.BiasAdd()
        self.lora_dim = int(lora_dim)
        rng = layers._state["rng"]
        r = self.lora_dim

        def normal(shape, std):
            return Tensor(rng.normal(0.0, std, size=shape).astype(np.float32))

        self.hada_w1_a = Parameter(normal((self.out_dim, r), 0.1), name="hada_w1_a")
        self.hada_w1_b = Parameter(normal((r, flat_in), 1.0), name="hada_w1_b")
        self.hada_w2_a = Parameter(Tensor(np.zeros((self.out_dim, r), np.float32)), name="hada_w2_a")
        self.hada_w2_b = Parameter(normal((r, flat_in), 1.0), name="hada_w2_b")

        self.wrap_layer(org_module, alpha, multiplier)
        self.dropout = None  # LyCORIS's LoHa has none; create_network refuses it
        self.rank_dropout = None if not rank_dropout else float(rank_dropout)
        self.module_dropout = None if not module_dropout else float(module_dropout)

    def delta_weight(self):
        """ΔW * multiplier in the layer weight's shape (a graph expression: the hada factors get gradients)."""
        w = ops.matmul(self.hada_w1_a, self.hada_w1_b) * ops.matmul(self.hada_w2_a, self.hada_w2_b)
        w = w * (self.multiplier * self.alpha / self.lora_dim).astype(w.dtype)
        if self.training and self.rank_dropout is not None:  # LyCORIS: rows (output channels) of ΔW dropped
            keep = (ops.rand((self.out_dim, 1)) > self.rank_dropout).astype(w.dtype)
            w = w * keep
        return w.reshape(self.delta_shape)

    def construct(self, x):
        if self.is_conv:
            org = self.conv(x, self.weight)
            if self.bias is not None:
                org = self.bias_add(org, self.bias.astype(x.dtype))
            delta = self.conv(x, self.delta_weight())
        else:
            org = layers.linear(x, self.weight, self.bias, self.bias_add, self.stored_dense)
            delta = ops.dense(x, self.delta_weight().astype(x.dtype))
        if self.training and self.module_dropout is not None:
            delta = delta * (ops.rand((1,)) >= self.module_dropout).astype(delta.dtype)
        return org + delta

    # -- what networks.network_base asks of a module --------------------------------

    def set_multiplier(self, multiplier):
        self.multiplier.set_data(Tensor(np.float32(multiplier)))

    def trainable_weights(self):
        return OrderedDict((leaf, getattr(self, leaf)) for leaf in LEAVES)

    def merged_shape(self, sd):
        out, flat_in = np.shape(sd["hada_w1_a"])[0], np.shape(sd["hada_w1_b"])[1]
        weight_shape = tuple(self.org_module.weight.shape)
        return weight_shape if (out, flat_in) == (weight_shape[0], int(np.prod(weight_shape[1:]))) else (out, flat_in)

    @staticmethod
    def delta_from(sd, multiplier):
        alpha = float(np.asarray(sd["alpha"], np.float32).reshape(-1)[0]) if "alpha" in sd else None
        return hada_delta(sd["hada_w1_a"], sd["hada_w1_b"], sd["hada_w2_a"], sd["hada_w2_b"], alpha, multiplier)

    def get_weight(self, multiplier=None):
        """ΔW (fp32 numpy, the layer weight's shape)."""
        multiplier = float(self.multiplier.asnumpy()) if multiplier is None else multiplier
        sd = {leaf: param_numpy(p) for leaf, p in self.trainable_weights().items()}
        sd["alpha"] = self.alpha.asnumpy()
        return self.delta_from(sd, multiplier).reshape(self.delta_shape)

    def max_norm_scale(self, max_norm_value):
        """kohya's max-norm step on ΔW (LyCORIS scales a scalar; here both ``_a`` factors by sqrt(ratio))."""
        norm0 = float(np.linalg.norm(self.get_weight(1.0)))
        norm = max(norm0, max_norm_value / 2)
        ratio = min(norm, max_norm_value) / norm
        if ratio != 1:
            s = np.float32(ratio ** 0.5)
            for p in (self.hada_w1_a, self.hada_w2_a):
                set_param(p, param_numpy(p).astype(np.float32) * s)
        return ratio != 1, norm0 * ratio


class LoHaNetwork(NetworkBase):
    """LyCORIS's LoHa on kohya's target layers; ``modules_dim`` / ``modules_alpha`` build it from a file."""

    KIND = "LoHa"

    def __init__(self, text_encoder, unet, multiplier=1.0, lora_dim=4, alpha=1.0, conv_lora_dim=None,
                 conv_alpha=None, rank_dropout=None, module_dropout=None, modules_dim=None, modules_alpha=None,
                 is_sdxl=True):
        self._init_common(multiplier, is_sdxl)
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = None, rank_dropout, module_dropout
        logger.info("create LoHa network. dim: %s, alpha: %s; conv dim %s, alpha %s", lora_dim, alpha, conv_lora_dim,
                    conv_alpha)

        def module_for(is_unet, lora_name, child):
            if modules_dim is not None:
                if lora_name not in modules_dim:
                    return None
                dim, alpha_ = modules_dim[lora_name], modules_alpha[lora_name]
            elif is_linear(child) or kernel(child) == (1, 1):
                dim, alpha_ = self.lora_dim, self.alpha
            elif self.conv_lora_dim:
                dim, alpha_ = self.conv_lora_dim, self.conv_alpha
            else:
                return None
            if not dim:
                return "skipped"
            return LoHaModule(lora_name, child, self.multiplier, dim, alpha_, rank_dropout=rank_dropout,
                              module_dropout=module_dropout)

        self._create_all(text_encoder, unet, modules_dim is not None or bool(conv_lora_dim), module_for)


# ---------------------------------------------------------------------------
# kohya's plugin functions


def _settings(network_dim, network_alpha, neuron_dropout, kwargs):
    lycoris_only = sorted(set(kwargs) & LYCORIS_ONLY_ARGS)
    if lycoris_only:
        raise UserError(f"network_args {', '.join(lycoris_only)}: LyCORIS option not supported by this port's "
                        f"networks.loha (supported: {', '.join(sorted(KNOWN_NETWORK_ARGS))})")
    unknown = sorted(set(kwargs) - KNOWN_NETWORK_ARGS)
    if unknown:
        raise UserError(f"unknown network_args for networks.loha: {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(KNOWN_NETWORK_ARGS))})")
    algo = str(kwargs.get("algo", "loha")).strip().lower()
    if algo not in ("loha", "hada"):
        raise UserError(f"network_args algo={algo}: networks.loha trains LoHa only"
                        + (" (plain LoRA: --network_module networks.lora)" if algo in ("lora", "locon") else ""))
    for name, p in (("--network_dropout", neuron_dropout), ("network_args dropout", float_arg(kwargs, "dropout"))):
        if p:
            raise UserError(f"{name} {p}: LoHa has no dropout on its rank activations (LyCORIS does not implement "
                            "it either); use rank_dropout or module_dropout")
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = kwargs.get("conv_dim")
    if conv_dim is not None:
        try:
            conv_dim = int(conv_dim)
        except ValueError:
            raise UserError(f"network_args conv_dim must be an integer, got '{conv_dim}'") from None
    conv_alpha = float_arg(kwargs, "conv_alpha")
    conv_alpha = network_alpha if conv_alpha is None else conv_alpha  # LyCORIS: conv_alpha defaults to alpha
    drops = {name: float_arg(kwargs, name) for name in ("rank_dropout", "module_dropout")}
    for name, p in drops.items():
        if p is not None and not 0.0 <= p < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {p}")
    return dict(lora_dim=network_dim, alpha=network_alpha, conv_lora_dim=conv_dim, conv_alpha=conv_alpha, **drops)


def check_network_args(kwargs: dict, is_sdxl: bool = True, network_dim=None, network_alpha=None,
                       neuron_dropout=None, dim_from_weights: bool = False):
    """The trainer's start check (no model needed): the ``network_args`` ``create_network`` would refuse."""
    if dim_from_weights:
        if kwargs:
            raise UserError(f"network_args {', '.join(sorted(kwargs))} cannot be combined with --dim_from_weights "
                            "for networks.loha (dims, alphas and conv layers come from the file)")
        return
    _settings(network_dim, network_alpha, neuron_dropout, kwargs)


def create_network(multiplier: float, network_dim: Optional[int], network_alpha: Optional[float], vae, text_encoder,
                   unet, neuron_dropout: Optional[float] = None, **kwargs):
    """kohya's ``create_network`` for LoHa (``network_args`` in ``kwargs`` as strings)."""
    s = _settings(network_dim, network_alpha, neuron_dropout, kwargs)
    return LoHaNetwork(text_encoder, unet, multiplier=multiplier, is_sdxl=is_sdxl_unet(unet), **s)


def _dims_alphas(weights_sd, source):
    dims, alphas, leaves = {}, {}, {}
    for key, value in weights_sd.items():
        if "." not in key:
            raise UserError(f"{source}: '{key}' is not a LoHa weight name (expected <module>.hada_w1_a ...)")
        name, leaf = key.split(".", 1)
        if leaf in ("hada_t1", "hada_t2"):
            raise UserError(f"{source}: {key}: LoHa with Tucker (use_tucker/CP) factors is not supported")
        if leaf not in LEAVES + ("alpha",):
            raise UserError(f"{source}: '{key}' is not a LoHa weight (expected {', '.join(LEAVES)}, alpha"
                            + ("; DoRA (dora_wd) LoHa is not supported" if leaf == "dora_scale" else "") + ")")
        leaves.setdefault(name, set()).add(leaf)
        if leaf == "hada_w1_b":
            dims[name] = int(np.shape(value)[0])
        elif leaf == "alpha":
            alphas[name] = float(np.asarray(value, np.float32).reshape(-1)[0])
    for name, have in leaves.items():
        lacking = [leaf for leaf in LEAVES if leaf not in have]
        if lacking:
            raise UserError(f"{source}: LoHa module {name} has no {lacking[0]}")
        alphas.setdefault(name, dims[name])
    return dims, alphas


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """kohya's ``create_network_from_weights``: dims/alphas (and which layers) from a LyCORIS LoHa file;
    returns ``(network, weights_sd)``. A module the models lack or a shape that does not fit: one line."""
    from library.lora_file import load_state_dict_file

    if kwargs:
        check_network_args(kwargs, dim_from_weights=True)
    source = file if file is not None else "LoHa weights"
    if weights_sd is None:
        weights_sd, _, _ = load_state_dict_file(file)
        if not weights_sd:
            raise UserError(f"{file}: holds no tensors")
    weights_sd = OrderedDict(weights_sd)
    dims, alphas = _dims_alphas(weights_sd, source)
    network = LoHaNetwork(text_encoder, unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
                          is_sdxl=is_sdxl_unet(unet))
    created = {m.lora_name for m in network.loras}
    missing = [name for name in dims if name not in created]
    if missing:
        raise UserError(f"{source}: LoHa module {missing[0]} does not exist in the model"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + "; a text encoder that was not given, or a LoHa for another model?")
    network.check_weights_fit(weights_sd, source)
    return network, weights_sd


__all__ = ["LoHaModule", "LoHaNetwork", "create_network", "create_network_from_weights", "check_network_args",
           "hada_delta", "parse_network_args"]
