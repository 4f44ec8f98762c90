"""LoRA files from other tools read in kohya's key layout: diffusers/PEFT-style SDXL keys
(``unet.down_blocks...lora_A.weight`` ...) and kohya keys with diffusers block names converted to
kohya's SGM names; file reading and the dims/alphas a file declares."""
import logging
import re
from collections import OrderedDict

import numpy as np

from library import layers
from library.device_utils import UserError
from library.lora_file import load_state_dict_file
from networks.lora_modules import LoRAModule

logger = logging.getLogger(__name__)


_PEFT_LEAVES = (
    (".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora_down.weight"), (".lora.up.weight", ".lora_up.weight"),
    (".lora_linear_layer.down.weight", ".lora_down.weight"), (".lora_linear_layer.up.weight", ".lora_up.weight"),
    ("_lora.down.weight", ".lora_down.weight"), ("_lora.up.weight", ".lora_up.weight"),
    (".alpha", ".alpha"),
)
_PROCESSOR_NAMES = {
    "to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
}
_TE_PROCESSOR_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DIFFUSERS_COMPONENTS = (("unet.", "lora_unet"), ("text_encoder_2.", "lora_te2"), ("text_encoder.", "lora_te1"))


def _unet_diffusers_to_sgm_module_map(unet):
    """{diffusers module path: SGM module path} for this UNet's Linear/Conv layers (from its topology)."""
    from library.sdxl_model_util import convert_sdxl_unet_state_dict_to_diffusers

    names = {}
    for path, cell in unet.cells_and_names():
        if isinstance(cell, (layers.Linear, layers.Conv2d, LoRAModule)):
            names[path + ".weight"] = None
        elif isinstance(cell, (layers.GroupNorm, layers.LayerNorm)):
            names[path + ".weight"] = None
    du = convert_sdxl_unet_state_dict_to_diffusers(names)
    sgm_keys = list(names)
    du_keys = list(du)
    return {d[:-len(".weight")]: s[:-len(".weight")] for d, s in zip(du_keys, sgm_keys)}


def _is_kohya_key(key):
    return key.startswith("lora_unet_") or key.startswith("lora_te")


def convert_diffusers_to_sai_if_needed(weights_sd, unet, dtypes=None):
    """Rename LoRA keys in place to kohya's SGM names: kohya keys with diffusers block names
    (``lora_unet_down_blocks_0_...``) and diffusers/PEFT keys (``unet.down_blocks.0....lora_A.weight``,
    ``text_encoder.text_model....``, old ``attn1.processor.to_q_lora.down.weight``). Returns the dict."""
    keys = list(weights_sd)
    if not keys:
        return weights_sd
    unet_map = None

    def sgm_path(du_path, original_key):
        nonlocal unet_map
        if unet is None:
            raise UserError(f"LoRA key '{original_key}' is for a UNet in diffusers layout, but no UNet was given")
        if unet_map is None:
            unet_map = _unet_diffusers_to_sgm_module_map(unet)
        if du_path not in unet_map:
            raise UserError(f"LoRA module '{original_key}' does not exist in this UNet (diffusers path {du_path})")
        return unet_map[du_path]

    renamed = OrderedDict()
    new_dtypes = {}
    for key in keys:
        value = weights_sd[key]
        new_key = key
        if _is_kohya_key(key):
            module, _, leaf = key.partition(".")
            if module.startswith("lora_unet_") and any(p in module for p in ("down_blocks_", "up_blocks_",
                                                                            "mid_block_")):
                if unet is None:
                    raise UserError(f"LoRA key '{key}' is for a UNet in diffusers layout, but no UNet was given")
                if unet_map is None:
                    unet_map = _unet_diffusers_to_sgm_module_map(unet)
                flat = {"lora_unet_" + d.replace(".", "_"): "lora_unet_" + s.replace(".", "_")
                        for d, s in unet_map.items()}
                if module not in flat:
                    raise UserError(f"LoRA module '{module}' does not exist in this UNet")
                new_key = flat[module] + "." + leaf
        else:
            component = None
            for prefix, kohya_prefix in _DIFFUSERS_COMPONENTS:
                if key.startswith(prefix):
                    component, rest = kohya_prefix, key[len(prefix):]
                    break
            if component is None:
                if key.startswith(("down_blocks.", "up_blocks.", "mid_block.")):
                    component, rest = "lora_unet", key
                else:
                    raise UserError(f"LoRA key '{key}' is in no known format (kohya lora_unet_/lora_te*_, "
                                    "diffusers unet./text_encoder./text_encoder_2. or PEFT lora_A/lora_B)")
            for old, new in _PEFT_LEAVES:
                if rest.endswith(old):
                    path, leaf = rest[:-len(old)], new[1:]
                    break
            else:
                raise UserError(f"LoRA key '{key}': unknown LoRA weight name (expected lora_A/lora_B, "
                                "lora.down/lora.up or alpha)")
            # old diffusers attention processors: attn1.processor.to_q_lora -> attn1.to_q
            m = re.match(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)$", path) or \
                re.match(r"(.*\.self_attn)\.(to_q|to_k|to_v|to_out)$", path)
            if m:
                names = _PROCESSOR_NAMES if component == "lora_unet" else _TE_PROCESSOR_NAMES
                path = m.group(1) + "." + names[m.group(2)]
            if component == "lora_unet":
                path = sgm_path(path, key)
            new_key = component + "_" + path.replace(".", "_") + "." + leaf
        if new_key in renamed:
            raise UserError(f"LoRA file has two entries for '{new_key}' (one is '{key}')")
        renamed[new_key] = value
        if dtypes is not None and key in dtypes:
            new_dtypes[new_key] = dtypes[key]
    weights_sd.clear()
    weights_sd.update(renamed)
    if dtypes is not None:
        dtypes.clear()
        dtypes.update(new_dtypes)
    if keys != list(weights_sd):
        logger.info("converted LoRA keys from diffusers/PEFT names to kohya's SGM names")
    return weights_sd


FOREIGN_KEYS_HINT = ("is it a LoRA for another model (SD 1.x/2.x LoRAs do not fit SDXL)? An SDXL LoRA with "
                     "diffusers/PEFT key names converts to kohya's with: python tools/convert_weights.py "
                     "--convert_keys --input <lora> --output <lora_kohya.safetensors>")


def _convert_keys_of(source, weights_sd, unet, dtypes=None):
    """``convert_diffusers_to_sai_if_needed`` whose errors name the LoRA file and the way out."""
    try:
        return convert_diffusers_to_sai_if_needed(weights_sd, unet, dtypes)
    except UserError as e:
        raise UserError(f"{source}: {e}; {FOREIGN_KEYS_HINT}") from None


def load_lora_weights_file(file, unet=None):
    """-> (weights_sd in kohya names, metadata, dtypes) from .safetensors / MindSpore .ckpt / torch .ckpt."""
    weights_sd, metadata, dtypes = load_state_dict_file(file)
    if not weights_sd:
        raise UserError(f"{file}: holds no tensors")
    _convert_keys_of(file, weights_sd, unet, dtypes)
    for key in weights_sd:
        if "." not in key:
            raise UserError(f"{file}: '{key}' is not a LoRA weight name (expected <module>.lora_down.weight ...)")
    return weights_sd, metadata, dtypes


def _dims_alphas_from_weights(weights_sd, file="LoRA weights"):
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        if "." not in key:
            continue
        lora_name, leaf = key.split(".", 1)
        if leaf == "alpha":
            modules_alpha[lora_name] = float(np.asarray(value, np.float32).reshape(-1)[0])
        elif leaf == "lora_down.weight":
            modules_dim[lora_name] = int(np.asarray(value).shape[0])
        elif leaf != "lora_up.weight":
            raise UserError(f"{file}: '{key}' is not a LoRA weight (expected .lora_down.weight, .lora_up.weight, "
                            ".alpha; LoCon/LyCORIS extras such as dora_scale are not supported)")
    for name in {k.split(".", 1)[0] for k in weights_sd}:
        if name not in modules_dim:
            raise UserError(f"{file}: module {name} has no lora_down.weight")
        if name + ".lora_up.weight" not in weights_sd:
            raise UserError(f"{file}: module {name} has no lora_up.weight")
    for key in modules_dim:
        modules_alpha.setdefault(key, modules_dim[key])  # old LoRA without alpha
    return modules_dim, modules_alpha
