"""What every network type shares (``networks.lora``, ``networks.loha``, a new one): the plugin loading
of ``--network_module``, finding the target layers and naming them as kohya does, swapping them for the
network's modules, the fit checks, save/load, merging, optimizer groups and the switches.

A network type provides a module class (an ``nn.Cell`` that replaces a Linear/Conv2d and owns its
``weight``/``bias``) with:

* ``lora_name``, ``org_module``, ``is_conv``, ``in_dim``, ``out_dim``, the Parameters ``alpha`` and
  ``multiplier``, ``set_multiplier``, and the plain attribute ``applied``;
* ``trainable_weights()``: ``{file leaf: Parameter}`` in file order (``alpha`` is written besides);
* ``PLUS_LEAVES``: the leaves LoRA+ trains with ``lr * ratio`` (empty: LoRA+ is not offered);
* ``delta_from(sd, multiplier)`` (a classmethod): the merged delta of one module's file arrays, fp32
  numpy in the layer weight's shape;
* ``max_norm_scale(max_norm)``: kohya's max-norm step for that module -> (scaled, norm after);

and a subclass of ``NetworkBase`` whose ``_module_for`` says which layers get a module with which
dim/alpha. Its module file then needs kohya's two functions, ``create_network`` and
``create_network_from_weights``; ``check_network_args`` (the ``network_args`` checks without a model,
run at start) is optional.
"""
import importlib
import logging
import os
from collections import OrderedDict
from typing import List, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from library import layers
from library.device_utils import UserError
from library.dtypes import ms_dtype
from library.lora_file import cast_array, normalize_dtype, save_state_dict_file, SAFETENSORS_EXT
from library.lora_metadata import precalculate_safetensors_hashes
from networks import lora_blocks
from networks.lora_blocks import get_block_index

logger = logging.getLogger(__name__)

# the network types of this port (for the tools that pick one from a file's keys)
NETWORK_MODULES = ("networks.lora", "networks.loha")

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
# the plugin point


def import_network_module(name):
    """kohya's ``importlib.import_module(args.network_module)``, with one line when the name is not a
    network module (a typo, or a module without kohya's two functions)."""
    if not name:
        raise UserError(f"--network_module is required ({' or '.join(NETWORK_MODULES)})")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"--network_module {name}: cannot import it ({e}); this port has "
                        f"{', '.join(NETWORK_MODULES)}") from None
    missing = [f for f in ("create_network", "create_network_from_weights") if not callable(getattr(module, f, None))]
    if missing:
        raise UserError(f"--network_module {name} is not a network module: it has no {' or '.join(missing)} "
                        f"(this port has {', '.join(NETWORK_MODULES)})")
    return module


def network_module_for_weights(keys, source="network weights"):
    """The network module whose file layout the weight names ``keys`` have (for the merge paths, which take
    any file): LyCORIS's LoHa leaves -> ``networks.loha``, LyCORIS's other layouts refused, else LoRA."""
    leaves = {str(k).rsplit(".", 1)[-1] for k in keys}
    if any(leaf.startswith("hada_") for leaf in leaves):
        return "networks.loha"
    lycoris = sorted(leaf for leaf in leaves if leaf.startswith(("lokr_", "oft_")) or leaf == "dora_scale")
    if lycoris:
        raise UserError(f"{source}: '{lycoris[0]}' weights (LyCORIS LoKr/OFT/DoRA) are not supported; this port "
                        "reads LoRA and LoHa files")
    return "networks.lora"


def create_network_from_weights_file(multiplier, file, vae, text_encoder, unet, for_inference=True, **kwargs):
    """``create_network_from_weights`` of the network type the file holds -> (network, weights_sd); a
    safetensors file's type is read from its header alone."""
    from library.lora_file import file_kind, load_state_dict_file
    from library.safetensors_io import SafetensorsReader

    if os.path.isfile(file) and file_kind(file) == "safetensors":
        with SafetensorsReader(file) as reader:
            keys = list(reader.keys())
    else:
        keys = list(load_state_dict_file(file)[0])
    module = importlib.import_module(network_module_for_weights(keys, file))
    return module.create_network_from_weights(multiplier, file, vae, text_encoder, unet, for_inference=for_inference,
                                              **kwargs)


# ---------------------------------------------------------------------------
# network_args helpers


def parse_network_args(network_args) -> dict:
    """``--network_args key=value ...`` -> {key: value string} (kohya splits at the first '=')."""
    kwargs = {}
    for net_arg in network_args or []:
        if "=" not in str(net_arg):
            raise UserError(f"--network_args: '{net_arg}' is not key=value")
        key, value = str(net_arg).split("=", 1)
        kwargs[key.strip()] = value
    return kwargs


def float_arg(kwargs, name):
    v = kwargs.get(name, None)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"network_args {name} must be a number, got '{v}'") from None


def is_sdxl_unet(unet):
    from library.sdxl_original_unet import SdxlUNet2DConditionModel
    return unet is not None and isinstance(unet, SdxlUNet2DConditionModel)


def is_linear(cell):
    return isinstance(cell, layers.Linear)


def is_conv(cell):
    return isinstance(cell, layers.Conv2d)


def kernel(cell):
    k = cell.kernel_size
    return tuple(k) if isinstance(k, (tuple, list)) else (k, k)


def param_numpy(p):
    if p.dtype == ms.bfloat16:
        return p.astype(ms.float32).asnumpy()
    return p.asnumpy()


def set_param(p, value, dtype=None):
    dtype = p.dtype if dtype is None else dtype
    if dtype == ms.bfloat16:
        p.set_data(Tensor(np.asarray(value, np.float32), dtype=ms.bfloat16))
    else:
        p.set_data(Tensor(np.asarray(value).astype(ms.dtype_to_nptype(dtype))))


class WrapsLayer:
    """What every network module shares with the layer it wraps: kohya's ``alpha`` (0 or None: the
    module's dim) and the multiplier as non-trained parameters, the layer's weight and bias owned (names
    unchanged), and the layer itself kept out of the cell tree."""

    def read_layer(self, lora_name, org_module):
        """``lora_name``, and the wrapped layer's kind and sizes: ``is_conv``, ``in_dim``, ``out_dim``."""
        self.lora_name = lora_name
        self.is_conv = is_conv(org_module)
        if self.is_conv:
            self.in_dim, self.out_dim = org_module.in_channels, org_module.out_channels
        else:
            self.in_dim, self.out_dim = org_module.in_features, org_module.out_features

    def wrap_layer(self, org_module, alpha, multiplier):
        if isinstance(alpha, (Tensor, np.ndarray, np.generic)):
            alpha = float(np.asarray(alpha.asnumpy() if isinstance(alpha, Tensor) else alpha, np.float32))
        alpha = self.lora_dim if alpha is None or alpha == 0 else alpha
        self.alpha = Parameter(Tensor(np.float32(alpha)), name="alpha", requires_grad=False)
        self.multiplier = Parameter(Tensor(np.float32(multiplier)), name="multiplier", requires_grad=False)
        self.weight = org_module.weight
        self.bias = org_module.bias
        object.__setattr__(self, "org_module_ref", [org_module])
        object.__setattr__(self, "applied", False)
        return alpha

    @property
    def org_module(self):
        return self.org_module_ref[0]


def _resolve(root, path):
    """(parent cell, key) for a dotted child path."""
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = parent._cells[p]
    return parent, parts[-1]


def dtype_name(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, ms.Type):
        return {ms.float32: "fp32", ms.float16: "fp16", ms.bfloat16: "bf16"}[dtype]
    return normalize_dtype(dtype)


# ---------------------------------------------------------------------------
# network


class NetworkBase:
    """Module swapping, naming, fit checks, save/load, merge and optimizer groups; a subclass decides which
    layers get a module (``_module_for``) and how a file is read (``read_weights_file``)."""

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
    KIND = "LoRA"  # the word the messages use for a module

    def _init_common(self, multiplier, is_sdxl):
        self.multiplier = multiplier
        self.is_sdxl = is_sdxl
        self.training = True
        self.loraplus_lr_ratio = None
        self.loraplus_unet_lr_ratio = None
        self.loraplus_text_encoder_lr_ratio = None
        self.block_lr_weight = None
        self.block_lr = False

    def _create_all(self, text_encoder, unet, with_conv3x3, module_for):
        """Create the modules of every text encoder and the U-Net: ``module_for(is_unet, lora_name, child)``
        returns the module, None (no module) or the string "skipped" (dim 0: counted for the warning)."""
        text_encoders = [] if text_encoder is None else (list(text_encoder) if isinstance(text_encoder, (list, tuple))
                                                        else [text_encoder])
        self.text_encoder_loras = []
        self._paths = {}  # lora_name -> (root model, child path)
        skipped = []
        for i, te in enumerate(text_encoders):
            if te is None:
                continue
            index = i + 1 if len(text_encoders) > 1 else None
            loras, sk = self._create_modules(False, index, te, self.TEXT_ENCODER_TARGET_REPLACE_MODULE, module_for)
            self.text_encoder_loras.extend(loras)
            skipped += sk
        logger.info("create %s for Text Encoder: %d modules.", self.KIND, len(self.text_encoder_loras))

        # kohya extends the target list in place (a class-attribute side effect); a copy here
        targets = list(self.UNET_TARGET_REPLACE_MODULE)
        if with_conv3x3:
            targets += self.UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
        self.unet_loras = []
        if unet is not None:
            self.unet_loras, sk = self._create_modules(True, None, unet, targets, module_for)
            skipped += sk
        names = set()
        for lora in self.text_encoder_loras + self.unet_loras:
            assert lora.lora_name not in names, f"duplicated lora name: {lora.lora_name}"
            names.add(lora.lora_name)
        self._all_lora_names = names
        logger.info("create %s for U-Net: %d modules.", self.KIND, len(self.unet_loras))
        return skipped

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
                if is_linear(child) or is_conv(child):
                    found.append((name + "." + child_name if name else child_name, child))
        return found

    def _create_modules(self, is_unet, text_encoder_idx, root, target_replace_modules, module_for):
        if is_unet:
            prefix = self.LORA_PREFIX_UNET
        elif text_encoder_idx is None:
            prefix = self.LORA_PREFIX_TEXT_ENCODER
        else:
            prefix = self.LORA_PREFIX_TEXT_ENCODER1 if text_encoder_idx == 1 else self.LORA_PREFIX_TEXT_ENCODER2
        loras, skipped = [], []
        for path, child in self.target_modules(root, target_replace_modules):
            lora_name = (prefix + "." + path).replace(".", "_")
            lora = module_for(is_unet, lora_name, child)
            if lora is None:
                continue
            if isinstance(lora, str):
                skipped.append(lora_name)
                continue
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

    def set_train(self, mode=True):
        self.training = bool(mode)
        for lora in self.loras:
            lora.set_train(mode)

    def train(self):
        self.set_train(True)

    def eval(self):
        self.set_train(False)

    # -- apply / merge -----------------------------------------------------------

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        """Replace the target layers inside the models by the modules (for training or unmerged inference)."""
        if apply_text_encoder:
            logger.info("enable %s for text encoder: %d modules", self.KIND, len(self.text_encoder_loras))
        else:
            self.text_encoder_loras = []
        if apply_unet:
            logger.info("enable %s for U-Net: %d modules", self.KIND, len(self.unet_loras))
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
                raise UserError(f"cannot apply {self.KIND} module {lora.lora_name}: the layer at '{path}' is not the "
                                "one it was created for (another LoRA already applied?)")
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
                raise UserError(f"{source}: {self.KIND} module {name} does not exist in {where}")
            shape = tuple(np.asarray(value).shape)
            if leaf == "alpha":
                if int(np.prod(shape)) != 1:
                    raise UserError(f"{source}: {key} should be a scalar, has shape {shape}")
                continue
            weights = lora.trainable_weights()
            if leaf not in weights:
                raise UserError(f"{source}: {key} is not a {self.KIND} weight (expected "
                                f"{', '.join(list(weights) + ['alpha'])})")
            expected = tuple(weights[leaf].shape)
            if shape != expected:
                kind = "conv" if lora.is_conv else "linear"
                raise UserError(f"{source}: {key} has shape {shape} but module {name} ({kind} "
                                f"{lora.in_dim}->{lora.out_dim}) needs {expected}")

    def merge_to(self, text_encoder, unet, weights_sd, dtype=None, device=None):
        """Merge ``weights_sd`` into the original weights: ``W += multiplier * delta``.

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
            missing = [leaf for leaf in lora.trainable_weights() if leaf not in sd]
            if missing:
                raise UserError(f"{self.KIND} module {lora.lora_name} has no {missing[0]}")
            merged_shape = lora.merged_shape(sd)
            weight_shape = tuple(lora.org_module.weight.shape)
            if merged_shape != weight_shape:
                raise UserError(f"{self.KIND} module {lora.lora_name}: merged shape {merged_shape} does not fit the "
                                f"layer weight {weight_shape}")
            todo.append((lora, sd))
        target = None if dtype is None else (dtype if isinstance(dtype, ms.Type) else ms_dtype(normalize_dtype(dtype)))
        for lora, sd in todo:
            delta = lora.delta_from(sd, float(lora.multiplier.asnumpy()))
            weight = lora.org_module.weight
            set_param(weight, param_numpy(weight).astype(np.float32) + delta.reshape(weight.shape), target)
        logger.info("weights are merged: %d modules", len(todo))

    # -- weights -----------------------------------------------------------------

    def state_dict(self):
        """kohya's state dict: ``<lora_name>.alpha`` and the module's weights under their file leaves (fp32
        numpy)."""
        sd = OrderedDict()
        for lora in self.loras:
            sd[f"{lora.lora_name}.alpha"] = np.asarray(lora.alpha.asnumpy(), np.float32)
            for leaf, p in lora.trainable_weights().items():
                sd[f"{lora.lora_name}.{leaf}"] = param_numpy(p).astype(np.float32)
        return sd

    def load_state_dict(self, weights_sd, strict=False, source="LoRA weights"):
        """Copy kohya-named arrays into the modules. Keys of modules that exist in the model but were not
        applied (e.g. text encoder with --network_train_unet_only) are reported as unexpected with a warning;
        keys that fit no module of the model, or shapes that differ, raise ``UserError``."""
        by_name = {lora.lora_name: lora for lora in self.loras}
        unexpected = [k for k in weights_sd if k.split(".", 1)[0] not in by_name]
        for key in unexpected:
            if key.split(".", 1)[0] not in self._all_lora_names:
                raise UserError(f"{source}: {self.KIND} module {key.split('.', 1)[0]} does not exist in the model")
        fit = OrderedDict((k, v) for k, v in weights_sd.items() if k not in unexpected)
        self.check_weights_fit(fit, source)
        missing = []
        for name, lora in by_name.items():
            for leaf, param in lora.trainable_weights().items():
                key = f"{name}.{leaf}"
                if key in fit:
                    set_param(param, np.asarray(fit[key], np.float32))
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

    def read_weights_file(self, file, unet):
        """-> weights_sd in this network's key layout (a subclass converts other tools' names)."""
        from library.lora_file import load_state_dict_file

        weights_sd, _, _ = load_state_dict_file(file)
        return weights_sd

    def load_weights(self, file):
        """Load a weights file (.safetensors / .ckpt / .pt) into the modules."""
        unet = None
        for lora in self.unet_loras:
            unet = self._paths[lora.lora_name][0]
            break
        weights_sd = self.read_weights_file(file, unet)
        return self.load_state_dict(weights_sd, False, file)

    def save_weights(self, file, dtype, metadata):
        """kohya's ``save_weights``: .safetensors (with sshs_* hashes in the metadata), MindSpore .ckpt, or .pt
        (kohya's torch.save file, no metadata), every tensor in ``dtype`` (None: as trained, fp32); written
        atomically."""
        if metadata is not None and len(metadata) == 0:
            metadata = None
        state_dict = self.state_dict()
        dtype = dtype_name(dtype)
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
        ``PLUS_LEAVES`` (LoRA: ``lora_up``) in a second group with ``lr * ratio``; groups whose lr is 0 or
        None are left out.
        """
        self.requires_grad_(True)
        all_params, lr_descriptions = [], []

        def assemble_params(loras, lr, ratio):
            groups = {"lora": [], "plus": []}
            for lora in loras:
                for leaf, p in lora.trainable_weights().items():
                    groups["plus" if ratio is not None and leaf in lora.PLUS_LEAVES else "lora"].append(p)
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
            for p in lora.trainable_weights().values():
                p.requires_grad = value

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def get_trainable_params(self):
        return [p for lora in self.loras for p in lora.trainable_weights().values()]

    def trainable_params(self):
        return self.get_trainable_params()

    def apply_max_norm_regularization(self, max_norm_value, device=None):
        """kohya's max-norm regularisation of each module's merged delta; returns (keys_scaled, mean norm,
        max norm)."""
        keys_scaled, norms = 0, []
        for lora in self.loras:
            scaled, norm = lora.max_norm_scale(max_norm_value)
            keys_scaled += int(scaled)
            norms.append(norm)
        return keys_scaled, sum(norms) / max(len(norms), 1), max(norms) if norms else 0.0
