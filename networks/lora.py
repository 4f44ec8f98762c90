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
reading in ``networks/lora_keys.py``, block dims and lr weights in ``networks/lora_blocks.py``; what
every network type shares (finding and swapping the layers, naming, fit checks, save/load, merge,
optimizer groups) in ``networks/network_base.py``.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Optional

from library.device_utils import UserError
from networks.lora_blocks import (  # noqa: F401  (kohya's names, re-exported)
    get_block_index, get_block_dims_and_alphas, get_block_lr_weight, parse_block_lr_kwargs, remove_block_dims_and_alphas)
from networks.lora_keys import (  # noqa: F401  (re-exported: the tools and tests import them from here)
    FOREIGN_KEYS_HINT, _convert_keys_of, _dims_alphas_from_weights, convert_diffusers_to_sai_if_needed,
    load_lora_weights_file)
from networks.lora_modules import (  # noqa: F401  (kohya's names, re-exported)
    LoRAInfModule, LoRAModule, _is_conv, _is_linear, _kernel, _param_numpy, _set_param, lora_delta)
from networks.network_base import (  # noqa: F401  (the shared machinery; names re-exported for the tools)
    MODULE_CLASS_EQUIVALENTS, NetworkBase, _resolve, dtype_name as _dtype_name, float_arg as _float_arg,
    is_sdxl_unet as _is_sdxl_unet, parse_network_args)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# network creation

KNOWN_NETWORK_ARGS = {
    "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "rank_dropout",
    "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
}


# kohya's create_network_from_weights reads only these network_args (its parse_block_lr_kwargs); the dims,
# alphas, conv and dropout settings come from the file or are not used there
FROM_WEIGHTS_NETWORK_ARGS = {"down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"}


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


class LoRANetwork(NetworkBase):
    """kohya's ``LoRANetwork``: which layers get a LoRA module with which dim/alpha (block dims, conv dims,
    dims from a file); the swapping, naming, save/load, merge and optimizer groups are ``NetworkBase``'s."""

    def __init__(self, text_encoder, unet, multiplier: float = 1.0, lora_dim: int = 4, alpha: float = 1,
                 dropout: Optional[float] = None, rank_dropout: Optional[float] = None,
                 module_dropout: Optional[float] = None, conv_lora_dim: Optional[int] = None,
                 conv_alpha: Optional[float] = None, block_dims: Optional[List[int]] = None,
                 block_alphas: Optional[List[float]] = None, conv_block_dims: Optional[List[int]] = None,
                 conv_block_alphas: Optional[List[float]] = None, modules_dim: Optional[Dict[str, int]] = None,
                 modules_alpha: Optional[Dict[str, float]] = None, module_class=LoRAModule,
                 varbose: Optional[bool] = False, is_sdxl: Optional[bool] = False):
        self._init_common(multiplier, is_sdxl)
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

        if modules_dim is not None:
            logger.info("create LoRA network from weights")
        elif block_dims is not None:
            logger.info("create LoRA network from block_dims: %s, alphas %s; conv %s, %s", block_dims, block_alphas,
                        conv_block_dims, conv_block_alphas)
        else:
            logger.info("create LoRA network. base dim (rank): %s, alpha: %s; conv dim %s, alpha %s", lora_dim, alpha,
                        conv_lora_dim, conv_alpha)

        def module_for(is_unet, lora_name, child):
            is_linear_or_1x1 = _is_linear(child) or (_is_conv(child) and _kernel(child) == (1, 1))
            dim = alpha = None
            if modules_dim is not None:
                if lora_name in modules_dim:
                    dim, alpha = modules_dim[lora_name], modules_alpha[lora_name]
            elif is_unet and block_dims is not None:
                block_idx = get_block_index(lora_name, self.is_sdxl)
                if is_linear_or_1x1:
                    dim, alpha = block_dims[block_idx], block_alphas[block_idx]
                elif conv_block_dims is not None:
                    dim, alpha = conv_block_dims[block_idx], conv_block_alphas[block_idx]
            else:
                if is_linear_or_1x1:
                    dim, alpha = self.lora_dim, self.alpha
                elif self.conv_lora_dim is not None:
                    dim, alpha = self.conv_lora_dim, self.conv_alpha
            if dim is None or dim == 0:
                if is_linear_or_1x1 or (self.conv_lora_dim is not None or conv_block_dims is not None):
                    return "skipped"
                return None
            return module_class(lora_name, child, self.multiplier, dim, alpha, dropout=self.dropout,
                                rank_dropout=self.rank_dropout, module_dropout=self.module_dropout)

        with_conv3x3 = modules_dim is not None or conv_lora_dim is not None or conv_block_dims is not None
        skipped = self._create_all(text_encoder, unet, with_conv3x3, module_for)
        if varbose and skipped:
            logger.warning("because block_lr_weight is 0 or dim (rank) is 0, %d LoRA modules are skipped",
                           len(skipped))

    def read_weights_file(self, file, unet):
        """A LoRA file (ours or torch kohya's; .safetensors / .ckpt; diffusers/PEFT keys converted)."""
        weights_sd, _, _ = load_lora_weights_file(file, unet)
        return weights_sd
