"""LoRA network for SDXL (kohya-ss/sd-scripts ``networks/lora.py``), in MindSpore.

Same names, arguments and file format as kohya's: ``create_network``,
``create_network_from_weights``, ``LoRANetwork`` (``apply_to``, ``merge_to``,
``load_weights``, ``save_weights``, ``prepare_optimizer_params``,
``set_multiplier``), module names ``lora_unet_*`` / ``lora_te1_*`` /
``lora_te2_*`` with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``.

Differences that MindSpore asks for:

* kohya monkey-patches ``org_module.forward``. Graph mode does not compile
  that, so ``apply_to`` REPLACES each target Linear/Conv2d cell inside the
  model by a ``LoRAModule`` that owns the original ``weight``/``bias``
  Parameters (their names are kept, so a base checkpoint still loads by name)
  plus ``lora_down``/``lora_up`` cells and two non-trainable scalars,
  ``alpha`` and ``multiplier`` (``<module path>.lora_down.weight`` ... as
  parameter names). The multiplier and alpha are Parameters: changing them
  does not recompile a graph.
* ``LoRANetwork`` is a plain object, not a Cell (its modules live inside the
  models); ``state_dict()`` returns numpy arrays under kohya's keys.
* A weights file that does not fit the model (a module the model does not
  have, a wrong shape) stops with one ``UserError`` line naming the module;
  ``merge_to`` checks everything before changing any weight.
* ``.ckpt`` output is a MindSpore checkpoint (metadata kept); torch-saved
  ``.ckpt``/``.pt`` LoRAs are read without torch. diffusers/PEFT-style SDXL
  LoRA keys (``unet.down_blocks...lora_A.weight`` ...) and kohya keys with
  diffusers block names are converted to kohya's SGM names on load.

The module that replaces a layer is in ``networks/lora_modules.py``, the key conversion and file
reading in ``networks/lora_keys.py``, block dims and lr weights in ``networks/lora_blocks.py``.
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from library import layers
from library.device_utils import UserError
from library.dtypes import ms_dtype
from library.lora_file import cast_array, normalize_dtype, save_state_dict_file, SAFETENSORS_EXT
from library.lora_metadata import precalculate_safetensors_hashes
from networks import lora_blocks
from networks.lora_blocks import (  # noqa: F401  (kohya's names, re-exported)
    get_block_index, get_block_dims_and_alphas, get_block_lr_weight, parse_block_lr_kwargs, remove_block_dims_and_alphas)
from networks.lora_keys import (  # noqa: F401  (re-exported: the tools and tests import them from here)
    FOREIGN_KEYS_HINT, _convert_keys_of, _dims_alphas_from_weights, convert_diffusers_to_sai_if_needed,
    load_lora_weights_file)
from networks.lora_modules import (  # noqa: F401  (kohya's names, re-exported)
    LoRAInfModule, LoRAModule, _is_conv, _is_linear, _kernel, _param_numpy, _set_param, lora_delta)

logger = logging.getLogger(__name__)

# kohya's (diffusers-era) module class names -> the classes that play their part here
MODULE_CLASS_EQUIVALENTS = {
    "Transformer2DModel": ("SpatialTransformer", "Transformer2DModel"),
    "ResnetBlock2D": ("ResBlock", "ResnetBlock2D"),
    "Downsample2D": ("Downsample", "Downsample2D"),
    "Upsample2D": ("Upsample", "Upsample2D"),
    "CLIPAttention": ("CLIPAttention",),
    "CLIPSdpaAttention": ("CLIPSdpaAttention",),
    "CLIPMLP": ("CLIPMLP",),
}


# ---------------------------------------------------------------------------
# network creation

KNOWN_NETWORK_ARGS = {
    "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "rank_dropout",
    "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
}


def _is_sdxl_unet(unet):
    from library.sdxl_original_unet import SdxlUNet2DConditionModel
    return unet is not None and isinstance(unet, SdxlUNet2DConditionModel)


def _float_arg(kwargs, name):
    v = kwargs.get(name, None)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"network_args {name} must be a number, got '{v}'") from None


# kohya's create_network_from_weights reads only these network_args (its parse_block_lr_kwargs); the dims,
# alphas, conv and dropout settings come from the file or are not used there
FROM_WEIGHTS_NETWORK_ARGS = {"down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"}


def parse_network_args(network_args) -> dict:
    """``--network_args key=value ...`` -> {key: value string} (kohya splits at the first '=')."""
    kwargs = {}
    for net_arg in network_args or []:
        if "=" not in str(net_arg):
            raise UserError(f"--network_args: '{net_arg}' is not key=value")
        key, value = str(net_arg).split("=", 1)
        kwargs[key.strip()] = value
    return kwargs


def _check_known_keys(kwargs):
    if "dropout" in kwargs:  # kohya's trainer passes it for LyCORIS; its networks.lora never reads it
        raise UserError("network_args dropout is LyCORIS's key, which networks.lora does not read (kohya ignores "
                        "it): use --network_dropout")
    unknown = sorted(set(kwargs) - KNOWN_NETWORK_ARGS)
    if unknown:
        raise UserError(f"unknown network_args for networks.lora: {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(KNOWN_NETWORK_ARGS))})")


def check_network_args(kwargs: dict, is_sdxl: bool = True, network_dim=None, network_alpha=None,
                       neuron_dropout=None, dim_from_weights: bool = False):
    """Every check ``create_network`` / ``create_network_from_weights`` makes on ``network_args``, without a
    model: the trainer runs it at start, so a typo stops the run before the checkpoint loads and the latents
    are cached. With ``dim_from_weights`` the keys kohya would drop there are refused."""
    _check_known_keys(kwargs)
    if dim_from_weights:
        unused = sorted(set(kwargs) - FROM_WEIGHTS_NETWORK_ARGS)
        if unused:
            raise UserError(f"network_args {', '.join(unused)} cannot be combined with --dim_from_weights (the "
                            f"network is built from --network_weights; kohya then reads only "
                            f"{', '.join(sorted(FROM_WEIGHTS_NETWORK_ARGS))} and drops the rest)")
        parse_block_lr_kwargs(is_sdxl, kwargs)
    else:
        _network_settings(is_sdxl, network_dim, network_alpha, neuron_dropout, kwargs)


def _network_settings(is_sdxl, network_dim, network_alpha, neuron_dropout, kwargs) -> dict:
    """``network_args`` and the dims parsed and checked as kohya's ``create_network`` does (no model needed)."""
    _check_known_keys(kwargs)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)

    conv_dim = kwargs.get("conv_dim", None)
    conv_alpha = kwargs.get("conv_alpha", None)
    if conv_dim is not None:
        try:
            conv_dim = int(conv_dim)
        except ValueError:
            raise UserError(f"network_args conv_dim must be an integer, got '{conv_dim}'") from None
        conv_alpha = 1.0 if conv_alpha is None else _float_arg(kwargs, "conv_alpha")

    block_dims = kwargs.get("block_dims", None)
    block_lr_weight = parse_block_lr_kwargs(is_sdxl, kwargs)
    if block_dims is not None or block_lr_weight is not None:
        block_dims, block_alphas, conv_block_dims, conv_block_alphas = get_block_dims_and_alphas(
            is_sdxl, block_dims, kwargs.get("block_alphas", None), network_dim, network_alpha,
            kwargs.get("conv_block_dims", None), kwargs.get("conv_block_alphas", None), conv_dim, conv_alpha)
        block_dims, block_alphas, conv_block_dims, conv_block_alphas = remove_block_dims_and_alphas(
            is_sdxl, block_dims, block_alphas, conv_block_dims, conv_block_alphas, block_lr_weight)
    else:
        for name in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if kwargs.get(name) is not None:
                raise UserError(f"network_args {name} needs block_dims (or a block lr weight) as well")
        block_alphas = conv_block_dims = conv_block_alphas = None

    rank_dropout = _float_arg(kwargs, "rank_dropout")
    module_dropout = _float_arg(kwargs, "module_dropout")
    for name, p in (("network_dropout", neuron_dropout), ("rank_dropout", rank_dropout),
                    ("module_dropout", module_dropout)):
        if p is not None and not 0.0 <= float(p) < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {p}")
    ratios = [_float_arg(kwargs, k) for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                              "loraplus_text_encoder_lr_ratio")]
    return dict(network_dim=network_dim, network_alpha=network_alpha, conv_dim=conv_dim, conv_alpha=conv_alpha,
                block_dims=block_dims, block_alphas=block_alphas, conv_block_dims=conv_block_dims,
                conv_block_alphas=conv_block_alphas, block_lr_weight=block_lr_weight, rank_dropout=rank_dropout,
                module_dropout=module_dropout, loraplus_ratios=ratios)


def create_network(multiplier: float, network_dim: Optional[int], network_alpha: Optional[float], vae, text_encoder,
                   unet, neuron_dropout: Optional[float] = None, **kwargs):
    """kohya's ``create_network``: ``network_args`` come in ``kwargs`` (strings as parsed from the command line)."""
    is_sdxl = _is_sdxl_unet(unet)
    s = _network_settings(is_sdxl, network_dim, network_alpha, neuron_dropout, kwargs)
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, lora_dim=s["network_dim"],
                          alpha=s["network_alpha"], dropout=neuron_dropout, rank_dropout=s["rank_dropout"],
                          module_dropout=s["module_dropout"], conv_lora_dim=s["conv_dim"], conv_alpha=s["conv_alpha"],
                          block_dims=s["block_dims"], block_alphas=s["block_alphas"],
                          conv_block_dims=s["conv_block_dims"], conv_block_alphas=s["conv_block_alphas"],
                          varbose=True, is_sdxl=is_sdxl)
    if any(r is not None for r in s["loraplus_ratios"]):
        network.set_loraplus_lr_ratio(*s["loraplus_ratios"])
    if s["block_lr_weight"] is not None:
        network.set_block_lr_weight(s["block_lr_weight"])
    return network


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """kohya's ``create_network_from_weights``: dims/alphas from the file; returns ``(network, weights_sd)``.

    Weights are not loaded here (``network.load_weights`` or ``network.merge_to`` do that). A file module
    that the models do not have, or whose shape does not fit, raises ``UserError`` naming it.
    """
    is_sdxl = _is_sdxl_unet(unet)
    check_network_args(kwargs, is_sdxl, dim_from_weights=True)  # what kohya would drop here stops instead
    source = file if file is not None else "LoRA weights"
    if weights_sd is None:
        weights_sd, _, _ = load_lora_weights_file(file, unet)
    else:
        weights_sd = _convert_keys_of(source, OrderedDict(weights_sd), unet)
    modules_dim, modules_alpha = _dims_alphas_from_weights(weights_sd, source)
    module_class = LoRAInfModule if for_inference else LoRAModule
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim,
                          modules_alpha=modules_alpha, module_class=module_class, is_sdxl=is_sdxl)
    created = {lora.lora_name: lora for lora in network.text_encoder_loras + network.unet_loras}
    missing = [name for name in modules_dim if name not in created]
    if missing:
        raise UserError(f"{source}: LoRA module {missing[0]} does not exist in the model"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + "; a text encoder that was not given? Or " + FOREIGN_KEYS_HINT)
    network.check_weights_fit(weights_sd, source)
    block_lr_weight = parse_block_lr_kwargs(is_sdxl, kwargs)
    if block_lr_weight is not None:
        network.set_block_lr_weight(block_lr_weight)
    return network, weights_sd


# ---------------------------------------------------------------------------
# network


def _resolve(root, path):
    """(parent cell, key) for a dotted child path."""
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = parent._cells[p]
    return parent, parts[-1]


class LoRANetwork:
    NUM_OF_BLOCKS = lora_blocks.NUM_OF_BLOCKS
    NUM_OF_MID_BLOCKS = lora_blocks.NUM_OF_MID_BLOCKS
    SDXL_NUM_OF_BLOCKS = lora_blocks.SDXL_NUM_OF_BLOCKS
    SDXL_NUM_OF_MID_BLOCKS = lora_blocks.SDXL_NUM_OF_MID_BLOCKS

    UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
    UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
    TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
    LORA_PREFIX_UNET = "lora_unet"
    LORA_PREFIX_TEXT_ENCODER = "lora_te"
    LORA_PREFIX_TEXT_ENCODER1 = "lora_te1"
    LORA_PREFIX_TEXT_ENCODER2 = "lora_te2"

    def __init__(self, text_encoder, unet, multiplier: float = 1.0, lora_dim: int = 4, alpha: float = 1,
                 dropout: Optional[float] = None, rank_dropout: Optional[float] = None,
                 module_dropout: Optional[float] = None, conv_lora_dim: Optional[int] = None,
                 conv_alpha: Optional[float] = None, block_dims: Optional[List[int]] = None,
                 block_alphas: Optional[List[float]] = None, conv_block_dims: Optional[List[int]] = None,
                 conv_block_alphas: Optional[List[float]] = None, modules_dim: Optional[Dict[str, int]] = None,
                 modules_alpha: Optional[Dict[str, float]] = None, module_class=LoRAModule,
                 varbose: Optional[bool] = False, is_sdxl: Optional[bool] = False):
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.loraplus_lr_ratio = None
        self.loraplus_unet_lr_ratio = None
        self.loraplus_text_encoder_lr_ratio = None
        self.is_sdxl = is_sdxl
        self.training = True

        if modules_dim is not None:
            logger.info("create LoRA network from weights")
        elif block_dims is not None:
            logger.info("create LoRA network from block_dims: %s, alphas %s; conv %s, %s", block_dims, block_alphas,
                        conv_block_dims, conv_block_alphas)
        else:
            logger.info("create LoRA network. base dim (rank): %s, alpha: %s; conv dim %s, alpha %s", lora_dim, alpha,
                        conv_lora_dim, conv_alpha)

        text_encoders = [] if text_encoder is None else (list(text_encoder) if isinstance(text_encoder, (list, tuple))
                                                        else [text_encoder])
        self.text_encoder_loras = []
        self._paths = {}  # lora_name -> (root model, child path)
        skipped = []
        for i, te in enumerate(text_encoders):
            if te is None:
                continue
            index = i + 1 if len(text_encoders) > 1 else None
            loras, sk = self._create_modules(False, index, te, self.TEXT_ENCODER_TARGET_REPLACE_MODULE, modules_dim,
                                             modules_alpha, block_dims, block_alphas, conv_block_dims,
                                             conv_block_alphas, module_class)
            self.text_encoder_loras.extend(loras)
            skipped += sk
        logger.info("create LoRA for Text Encoder: %d modules.", len(self.text_encoder_loras))

        # kohya extends the target list in place (a class-attribute side effect); a copy here
        targets = list(self.UNET_TARGET_REPLACE_MODULE)
        if modules_dim is not None or conv_lora_dim is not None or conv_block_dims is not None:
            targets += self.UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
        self.unet_loras = []
        if unet is not None:
            self.unet_loras, sk = self._create_modules(True, None, unet, targets, modules_dim, modules_alpha,
                                                       block_dims, block_alphas, conv_block_dims, conv_block_alphas,
                                                       module_class)
            skipped += sk
        logger.info("create LoRA for U-Net: %d modules.", len(self.unet_loras))
        if varbose and skipped:
            logger.warning("because block_lr_weight is 0 or dim (rank) is 0, %d LoRA modules are skipped",
                           len(skipped))

        self.block_lr_weight = None
        self.block_lr = False
        names = set()
        for lora in self.text_encoder_loras + self.unet_loras:
            assert lora.lora_name not in names, f"duplicated lora name: {lora.lora_name}"
            names.add(lora.lora_name)
        self._all_lora_names = names

    # -- creation ------------------------------------------------------------

    @staticmethod
    def target_modules(root, target_replace_modules):
        """[(child path, child cell)] for every Linear/Conv2d under a target module, in kohya's order."""
        classes = set()
        for t in target_replace_modules:
            classes.update(MODULE_CLASS_EQUIVALENTS.get(t, (t,)))
        found = []
        for name, module in root.cells_and_names():
            if type(module).__name__ not in classes:
                continue
            for child_name, child in module.cells_and_names():
                if _is_linear(child) or _is_conv(child):
                    found.append((name + "." + child_name if name else child_name, child))
        return found

    @classmethod
    def lora_names(cls, root, target_replace_modules, prefix):
        """kohya's module names ``<prefix>_<path with _>`` for a model (no LoRA is created)."""
        return [(prefix + "." + path).replace(".", "_") for path, _ in cls.target_modules(root, target_replace_modules)]

    def _create_modules(self, is_unet, text_encoder_idx, root, target_replace_modules, modules_dim, modules_alpha,
                        block_dims, block_alphas, conv_block_dims, conv_block_alphas, module_class):
        if is_unet:
            prefix = self.LORA_PREFIX_UNET
        elif text_encoder_idx is None:
            prefix = self.LORA_PREFIX_TEXT_ENCODER
        else:
            prefix = self.LORA_PREFIX_TEXT_ENCODER1 if text_encoder_idx == 1 else self.LORA_PREFIX_TEXT_ENCODER2
        loras, skipped = [], []
        for path, child in self.target_modules(root, target_replace_modules):
            is_linear = _is_linear(child)
            is_conv2d_1x1 = _is_conv(child) and _kernel(child) == (1, 1)
            lora_name = (prefix + "." + path).replace(".", "_")
            dim = alpha = None
            if modules_dim is not None:
                if lora_name in modules_dim:
                    dim, alpha = modules_dim[lora_name], modules_alpha[lora_name]
            elif is_unet and block_dims is not None:
                block_idx = get_block_index(lora_name, self.is_sdxl)
                if is_linear or is_conv2d_1x1:
                    dim, alpha = block_dims[block_idx], block_alphas[block_idx]
                elif conv_block_dims is not None:
                    dim, alpha = conv_block_dims[block_idx], conv_block_alphas[block_idx]
            else:
                if is_linear or is_conv2d_1x1:
                    dim, alpha = self.lora_dim, self.alpha
                elif self.conv_lora_dim is not None:
                    dim, alpha = self.conv_lora_dim, self.conv_alpha
            if dim is None or dim == 0:
                if is_linear or is_conv2d_1x1 or (self.conv_lora_dim is not None or conv_block_dims is not None):
                    skipped.append(lora_name)
                continue
            lora = module_class(lora_name, child, self.multiplier, dim, alpha, dropout=self.dropout,
                                rank_dropout=self.rank_dropout, module_dropout=self.module_dropout)
            self._paths[lora_name] = (root, path)
            loras.append(lora)
        return loras, skipped

    # -- switches --------------------------------------------------------------

    @property
    def loras(self):
        return self.text_encoder_loras + self.unet_loras

    def set_multiplier(self, multiplier):
        """Change the multiplier of every module (a Parameter: compiled graphs stay valid)."""
        self.multiplier = multiplier
        for lora in self.loras:
            lora.set_multiplier(multiplier)

    def set_enabled(self, is_enabled):
        for lora in self.loras:
            lora.enabled = bool(is_enabled)
            lora.set_multiplier(self.multiplier if is_enabled else 0.0)

    def set_train(self, mode=True):
        self.training = bool(mode)
        for lora in self.loras:
            lora.set_train(mode)

    def train(self):
        self.set_train(True)

    def eval(self):
        self.set_train(False)

    def is_mergeable(self):
        return True

    # -- apply / merge -----------------------------------------------------------

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        """Replace the target layers inside the models by the LoRA modules (for training or unmerged inference)."""
        if apply_text_encoder:
            logger.info("enable LoRA for text encoder: %d modules", len(self.text_encoder_loras))
        else:
            self.text_encoder_loras = []
        if apply_unet:
            logger.info("enable LoRA for U-Net: %d modules", len(self.unet_loras))
        else:
            self.unet_loras = []
        kept = {lora.lora_name for lora in self.loras}  # no references to models left unused (memory)
        self._paths = {name: v for name, v in self._paths.items() if name in kept}
        roots = {}
        for lora in self.loras:
            if lora.applied:
                continue
            root, path = self._paths[lora.lora_name]
            parent, key = _resolve(root, path)
            current = parent._cells.get(key)
            if current is not lora.org_module:
                raise UserError(f"cannot apply LoRA module {lora.lora_name}: the layer at '{path}' is not the one "
                                "it was created for (another LoRA already applied?)")
            prefix = lora.org_module.weight.name[:-len("weight")]
            if isinstance(parent, (nn.SequentialCell, nn.CellList)):
                parent[int(key)] = lora
            else:
                setattr(parent, key, lora)
            for name, p in lora.parameters_and_names():
                p.name = prefix + name
            lora.applied = True
            roots[id(root)] = root
        for root in roots.values():
            layers.recompile_on_next_call(root)

    def check_weights_fit(self, weights_sd, source="LoRA weights"):
        """UserError naming the first module of ``weights_sd`` that the network's modules do not fit."""
        by_name = {lora.lora_name: lora for lora in self.loras}
        for key, value in weights_sd.items():
            name, leaf = key.split(".", 1)
            lora = by_name.get(name)
            if lora is None:
                where = "this network" if name in self._all_lora_names else "the model"
                raise UserError(f"{source}: LoRA module {name} does not exist in {where}")
            shape = tuple(np.asarray(value).shape)
            if leaf == "alpha":
                if int(np.prod(shape)) != 1:
                    raise UserError(f"{source}: {key} should be a scalar, has shape {shape}")
                continue
            expected = tuple(lora.lora_down.weight.shape if leaf == "lora_down.weight" else lora.lora_up.weight.shape)
            if shape != expected:
                kind = "conv" if lora.is_conv else "linear"
                raise UserError(f"{source}: {key} has shape {shape} but module {name} ({kind} "
                                f"{lora.in_dim}->{lora.out_dim}) needs {expected}")

    def merge_to(self, text_encoder, unet, weights_sd, dtype=None, device=None):
        """Merge ``weights_sd`` into the original weights: ``W += multiplier * up@down * alpha/dim``.

        Every module's shapes are checked before any weight is written (a file that does not fit leaves
        the models unchanged); then the modules are merged one at a time, as kohya does, so that only one
        merged weight exists besides the model at any moment (computing all of them first doubled the
        full-size U-Net's memory).
        """
        apply_text_encoder = any(k.startswith(self.LORA_PREFIX_TEXT_ENCODER) for k in weights_sd)
        apply_unet = any(k.startswith(self.LORA_PREFIX_UNET) for k in weights_sd)
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        self.check_weights_fit(weights_sd)
        per_module = {}
        for key, value in weights_sd.items():
            name, leaf = key.split(".", 1)
            per_module.setdefault(name, {})[leaf] = value
        todo = []
        for lora in self.loras:
            sd = per_module.get(lora.lora_name)
            if sd is None:
                continue
            up, down = np.shape(sd["lora_up.weight"]), np.shape(sd["lora_down.weight"])
            merged_shape = (up[0], down[1]) + tuple(down[2:])
            weight_shape = tuple(lora.org_module.weight.shape)
            if merged_shape != weight_shape:
                raise UserError(f"LoRA module {lora.lora_name}: merged shape {merged_shape} does not fit the layer "
                                f"weight {weight_shape}")
            todo.append((lora, sd))
        target = None if dtype is None else (dtype if isinstance(dtype, ms.Type) else ms_dtype(normalize_dtype(dtype)))
        for lora, sd in todo:
            alpha = float(np.asarray(sd["alpha"], np.float32).reshape(-1)[0]) if "alpha" in sd else None
            delta = lora_delta(sd["lora_up.weight"], sd["lora_down.weight"], alpha, float(lora.multiplier.asnumpy()))
            weight = lora.org_module.weight
            _set_param(weight, _param_numpy(weight).astype(np.float32) + delta, target)
        logger.info("weights are merged: %d modules", len(todo))

    # -- weights -----------------------------------------------------------------

    def state_dict(self):
        """kohya's state dict: ``<lora_name>.alpha``, ``.lora_down.weight``, ``.lora_up.weight`` (fp32 numpy)."""
        sd = OrderedDict()
        for lora in self.loras:
            sd[f"{lora.lora_name}.alpha"] = np.asarray(lora.alpha.asnumpy(), np.float32)
            sd[f"{lora.lora_name}.lora_down.weight"] = _param_numpy(lora.lora_down.weight).astype(np.float32)
            sd[f"{lora.lora_name}.lora_up.weight"] = _param_numpy(lora.lora_up.weight).astype(np.float32)
        return sd

    def load_state_dict(self, weights_sd, strict=False, source="LoRA weights"):
        """Copy kohya-named arrays into the modules. Keys of modules that exist in the model but were not
        applied (e.g. text encoder with --network_train_unet_only) are reported as unexpected with a warning;
        keys that fit no module of the model, or shapes that differ, raise ``UserError``."""
        by_name = {lora.lora_name: lora for lora in self.loras}
        unexpected = [k for k in weights_sd if k.split(".", 1)[0] not in by_name]
        for key in unexpected:
            if key.split(".", 1)[0] not in self._all_lora_names:
                raise UserError(f"{source}: LoRA module {key.split('.', 1)[0]} does not exist in the model")
        fit = OrderedDict((k, v) for k, v in weights_sd.items() if k not in unexpected)
        self.check_weights_fit(fit, source)
        missing = []
        for name, lora in by_name.items():
            for leaf, param in (("lora_down.weight", lora.lora_down.weight), ("lora_up.weight", lora.lora_up.weight)):
                key = f"{name}.{leaf}"
                if key in fit:
                    _set_param(param, np.asarray(fit[key], np.float32))
                else:
                    missing.append(key)
            if f"{name}.alpha" in fit:
                lora.alpha.set_data(Tensor(np.float32(np.asarray(fit[f'{name}.alpha'], np.float32).reshape(-1)[0])))
            else:
                missing.append(f"{name}.alpha")
        if unexpected:
            logger.warning("%s: %d weights of modules not applied were not loaded (e.g. %s)", source,
                           len(unexpected), unexpected[0])
        if strict and (missing or unexpected):
            raise UserError(f"{source}: weights do not match the network: {len(missing)} missing "
                            f"({missing[:3]}), {len(unexpected)} unexpected ({unexpected[:3]})")
        return missing, unexpected

    def load_weights(self, file):
        """Load a LoRA file (ours or torch kohya's; .safetensors / .ckpt; diffusers/PEFT keys converted)."""
        unet = None
        for lora in self.unet_loras:
            unet = self._paths[lora.lora_name][0]
            break
        weights_sd, _, _ = load_lora_weights_file(file, unet)
        return self.load_state_dict(weights_sd, False, file)

    def save_weights(self, file, dtype, metadata):
        """kohya's ``save_weights``: .safetensors (with sshs_* hashes in the metadata), MindSpore .ckpt, or .pt
        (kohya's torch.save file, no metadata), every tensor in ``dtype`` (None: as trained, fp32); written
        atomically."""
        if metadata is not None and len(metadata) == 0:
            metadata = None
        state_dict = self.state_dict()
        dtype = _dtype_name(dtype)
        dtypes = None
        if dtype is not None:
            for key in list(state_dict):
                state_dict[key] = cast_array(state_dict[key], dtype)
            dtypes = {k: dtype for k in state_dict}
        if os.path.splitext(file)[1].lower() == SAFETENSORS_EXT:
            if metadata is None:
                metadata = {}
            model_hash, legacy_hash = precalculate_safetensors_hashes(state_dict, metadata, dtypes)
            metadata["sshs_model_hash"] = model_hash
            metadata["sshs_legacy_hash"] = legacy_hash
        save_state_dict_file(file, state_dict, metadata, dtypes)

    # -- optimizer -------------------------------------------------------------

    def set_block_lr_weight(self, block_lr_weight: Optional[List[float]]):
        self.block_lr = True
        self.block_lr_weight = block_lr_weight

    def get_lr_weight(self, block_idx: int) -> float:
        if not self.block_lr or self.block_lr_weight is None:
            return 1.0
        return self.block_lr_weight[block_idx]

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        logger.info("LoRA+ UNet LR Ratio: %s", self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio)
        logger.info("LoRA+ Text Encoder LR Ratio: %s", self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """kohya's parameter groups ``[{"params": [...], "lr": lr}, ...]`` and their descriptions.

        ``text_encoder_lr``: a number, or a list of one (both text encoders) or two (one per text encoder).
        Groups: text encoder(s), then UNet (one per block with block lr weights); LoRA+ puts each module's
        ``lora_up`` in a second group with ``lr * ratio``; groups whose lr is 0 or None are left out.
        """
        self.requires_grad_(True)
        all_params, lr_descriptions = [], []

        def assemble_params(loras, lr, ratio):
            groups = {"lora": [], "plus": []}
            for lora in loras:
                for p in (lora.lora_down.weight, lora.lora_up.weight):
                    is_up = p is lora.lora_up.weight
                    groups["plus" if ratio is not None and is_up else "lora"].append(p)
            params, descriptions = [], []
            for key, plist in groups.items():
                if not plist:
                    continue
                data = {"params": plist}
                if lr is not None:
                    data["lr"] = lr * ratio if key == "plus" else lr
                if data.get("lr", None) == 0 or data.get("lr", None) is None:
                    logger.info("NO LR skipping!")
                    continue
                params.append(data)
                descriptions.append("plus" if key == "plus" else "")
            return params, descriptions

        te_lrs = text_encoder_lr if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        te_lrs = [default_lr if lr is None else lr for lr in te_lrs] or [default_lr]
        if len(set(te_lrs)) == 1:  # one group for both text encoders, as kohya's lora.py
            te_groups = [("textencoder", self.text_encoder_loras, te_lrs[0])]
        else:  # one lr per text encoder, as kohya's networks with several text encoders
            prefixes = (self.LORA_PREFIX_TEXT_ENCODER1, self.LORA_PREFIX_TEXT_ENCODER2)
            te_groups = [(f"textencoder {i + 1}", [m for m in self.text_encoder_loras
                                                   if m.lora_name.startswith(prefix)], lr)
                         for i, (prefix, lr) in enumerate(zip(prefixes, te_lrs))]
        ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        for name, loras, lr in te_groups:
            if not loras:
                continue
            params, descriptions = assemble_params(loras, lr, ratio)
            all_params.extend(params)
            lr_descriptions.extend([name + (" " + d if d else "") for d in descriptions])

        if self.unet_loras:
            base_lr = unet_lr if unet_lr is not None else default_lr
            ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            if self.block_lr:
                is_sdxl = any("input_blocks" in l.lora_name or "output_blocks" in l.lora_name for l in self.unet_loras)
                block_idx_to_lora = OrderedDict()
                for lora in self.unet_loras:
                    block_idx_to_lora.setdefault(get_block_index(lora.lora_name, is_sdxl), []).append(lora)
                for idx, block_loras in block_idx_to_lora.items():
                    params, descriptions = assemble_params(
                        block_loras, None if base_lr is None else base_lr * self.get_lr_weight(idx), ratio)
                    all_params.extend(params)
                    lr_descriptions.extend([f"unet_block{idx}" + (" " + d if d else "") for d in descriptions])
            else:
                params, descriptions = assemble_params(self.unet_loras, base_lr, ratio)
                all_params.extend(params)
                lr_descriptions.extend(["unet" + (" " + d if d else "") for d in descriptions])
        return all_params, lr_descriptions

    def requires_grad_(self, value=True):
        for lora in self.loras:
            lora.lora_down.weight.requires_grad = value
            lora.lora_up.weight.requires_grad = value

    def enable_gradient_checkpointing(self):
        pass  # not supported, as kohya

    def prepare_grad_etc(self, text_encoder, unet):
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def get_trainable_params(self):
        return [p for lora in self.loras for p in (lora.lora_down.weight, lora.lora_up.weight)]

    def trainable_params(self):
        return self.get_trainable_params()

    def apply_max_norm_regularization(self, max_norm_value, device=None):
        """kohya's max-norm regularisation of each module's ``up@down*scale``; returns
        (keys_scaled, mean norm, max norm)."""
        keys_scaled, norms = 0, []
        for lora in self.loras:
            down = _param_numpy(lora.lora_down.weight).astype(np.float32)
            up = _param_numpy(lora.lora_up.weight).astype(np.float32)
            updown = lora_delta(up, down, float(lora.alpha.asnumpy()), 1.0)
            norm = max(float(np.linalg.norm(updown)), max_norm_value / 2)
            desired = min(norm, max_norm_value)
            ratio = desired / norm
            if ratio != 1:
                keys_scaled += 1
                s = np.float32(ratio ** 0.5)
                _set_param(lora.lora_up.weight, up * s)
                _set_param(lora.lora_down.weight, down * s)
            norms.append(float(np.linalg.norm(updown)) * ratio)
        return keys_scaled, sum(norms) / max(len(norms), 1), max(norms) if norms else 0.0


def _dtype_name(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, ms.Type):
        return {ms.float32: "fp32", ms.float16: "fp16", ms.bfloat16: "bf16"}[dtype]
    return normalize_dtype(dtype)
