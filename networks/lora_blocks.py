"""Block-wise LoRA settings for SDXL (kohya's ``networks/lora.py`` functions):
per-block dims/alphas (``block_dims``, ``block_alphas``, ``conv_block_dims``,
``conv_block_alphas``) and per-block learning-rate weights
(``down_lr_weight``/``mid_lr_weight``/``up_lr_weight`` with presets and
``block_lr_zero_threshold``). SDXL has 23 blocks: 0 time/label embedding,
1-9 input_blocks, 10-12 middle block, 13-21 output_blocks, 22 out.
"""
import logging
import math
import re
from typing import Dict, List, Optional

from library.device_utils import UserError

logger = logging.getLogger(__name__)

# block counts per half (kohya's LoRANetwork class attributes of the same names)
NUM_OF_BLOCKS = 12
NUM_OF_MID_BLOCKS = 1
SDXL_NUM_OF_BLOCKS = 9  # 1 (emb) + 9 (input) + 3 (mid) + 9 (output) + 1 (out) = 23
SDXL_NUM_OF_MID_BLOCKS = 3

RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")




def get_block_index(lora_name: str, is_sdxl: bool = False) -> int:
    """Block of a UNet LoRA module: SDXL 0 (time/label emb), 1-9 input_blocks, 10-12 middle, 13-21 output, 22 out."""
    block_idx = -1
    if not is_sdxl:
        m = RE_UPDOWN.search(lora_name)
        if m:
            g = m.groups()
            i, j = int(g[1]), int(g[3])
            idx = 3 * i + 2 if g[2] in ("upsamplers", "downsamplers") else 3 * i + j
            block_idx = 1 + idx if g[0] == "down" else NUM_OF_BLOCKS + 1 + idx
        elif "mid_block_" in lora_name:
            block_idx = NUM_OF_BLOCKS
    elif lora_name.startswith("lora_unet_"):
        name = lora_name[len("lora_unet_"):]
        if name.startswith("time_embed_") or name.startswith("label_emb_"):
            block_idx = 0
        elif name.startswith("input_blocks_"):
            block_idx = 1 + int(name.split("_")[2])
        elif name.startswith("middle_block_"):
            block_idx = 10 + int(name.split("_")[2])
        elif name.startswith("output_blocks_"):
            block_idx = 13 + int(name.split("_")[2])
        elif name.startswith("out_"):
            block_idx = 22
    return block_idx


def _num_total_blocks(is_sdxl):
    if not is_sdxl:
        return NUM_OF_BLOCKS * 2 + NUM_OF_MID_BLOCKS
    return 1 + SDXL_NUM_OF_BLOCKS * 2 + SDXL_NUM_OF_MID_BLOCKS + 1  # 23


def _parse_numbers(s, cast, what):
    if isinstance(s, (list, tuple)):
        return [cast(v) for v in s]
    try:
        return [cast(v) for v in str(s).split(",")]
    except ValueError:
        raise UserError(f"network_args {what}: expected comma-separated numbers, got '{s}'") from None


def get_block_dims_and_alphas(is_sdxl, block_dims, block_alphas, network_dim, network_alpha, conv_block_dims,
                              conv_block_alphas, conv_dim, conv_alpha):
    n = _num_total_blocks(is_sdxl)

    def check(values, what):
        if len(values) != n:
            raise UserError(f"network_args {what} must have {n} elements (got {len(values)})")
        return values

    if block_dims is not None:
        block_dims = check(_parse_numbers(block_dims, int, "block_dims"), "block_dims")
    else:
        logger.warning("block_dims is not specified. all dims are set to %s", network_dim)
        block_dims = [network_dim] * n
    if block_alphas is not None:
        block_alphas = check(_parse_numbers(block_alphas, float, "block_alphas"), "block_alphas")
    else:
        logger.warning("block_alphas is not specified. all alphas are set to %s", network_alpha)
        block_alphas = [network_alpha] * n
    if conv_block_dims is not None:
        conv_block_dims = check(_parse_numbers(conv_block_dims, int, "conv_block_dims"), "conv_block_dims")
        if conv_block_alphas is not None:
            conv_block_alphas = check(_parse_numbers(conv_block_alphas, float, "conv_block_alphas"),
                                      "conv_block_alphas")
        else:
            conv_alpha = 1.0 if conv_alpha is None else conv_alpha
            logger.warning("conv_block_alphas is not specified. all alphas are set to %s", conv_alpha)
            conv_block_alphas = [conv_alpha] * n
    elif conv_dim is not None:
        conv_block_dims = [conv_dim] * n
        conv_block_alphas = [conv_alpha] * n
    else:
        conv_block_dims = conv_block_alphas = None
    return block_dims, block_alphas, conv_block_dims, conv_block_alphas


LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def get_block_lr_weight(is_sdxl, down_lr_weight, mid_lr_weight, up_lr_weight, zero_threshold) -> Optional[List[float]]:
    """Per-block lr multipliers (kohya): presets ``cosine|sine|linear|reverse_linear|zeros[+base]`` or lists;
    short lists are filled with 1, long ones cut; values <= ``zero_threshold`` become 0. SDXL gets 1.0
    prepended/appended for the emb and out blocks (23 values)."""
    if up_lr_weight is None and mid_lr_weight is None and down_lr_weight is None:
        return None
    if not is_sdxl:
        max_len, max_mid = NUM_OF_BLOCKS, NUM_OF_MID_BLOCKS
    else:
        max_len, max_mid = SDXL_NUM_OF_BLOCKS, SDXL_NUM_OF_MID_BLOCKS

    def preset(name_with_suffix):
        tokens = name_with_suffix.split("+")
        name = tokens[0]
        try:
            base = float(tokens[1]) if len(tokens) > 1 else 0.0
        except ValueError:
            raise UserError(f"network_args lr weight preset '{name_with_suffix}': bad '+base' value") from None
        d = max_len - 1
        if name == "cosine":
            return [math.sin(math.pi * (i / d) / 2) + base for i in reversed(range(max_len))]
        if name == "sine":
            return [math.sin(math.pi * (i / d) / 2) + base for i in range(max_len)]
        if name == "linear":
            return [i / d + base for i in range(max_len)]
        if name == "reverse_linear":
            return [i / d + base for i in reversed(range(max_len))]
        if name == "zeros":
            return [0.0 + base] * max_len
        raise UserError(f"network_args: unknown lr weight preset '{name}' (valid: {', '.join(LR_WEIGHT_PRESETS)}, "
                        "optionally +base, or comma-separated values)")

    if isinstance(down_lr_weight, str):
        down_lr_weight = preset(down_lr_weight)
    if isinstance(up_lr_weight, str):
        up_lr_weight = preset(up_lr_weight)

    def fit(values, length, what):
        if values is None:
            return [1.0] * length
        if len(values) > length:
            logger.warning("%s is too long. Parameters after %d-th are ignored.", what, length)
            values = values[:length]
        elif len(values) < length:
            logger.warning("%s is too short. Parameters after %d-th are filled with 1.", what, len(values))
            values = list(values) + [1.0] * (length - len(values))
        return [w if w > zero_threshold else 0 for w in values]

    down = fit(down_lr_weight, max_len, "down_lr_weight")
    mid = fit(mid_lr_weight, max_mid, "mid_lr_weight")
    up = fit(up_lr_weight, max_len, "up_lr_weight")
    logger.info("apply block learning rate: down %s, mid %s, up %s", down, mid, up)
    lr_weight = down + mid + up
    if is_sdxl:
        lr_weight = [1.0] + lr_weight + [1.0]
    return lr_weight


def parse_block_lr_kwargs(is_sdxl: bool, nw_kwargs: Dict) -> Optional[List[float]]:
    down = nw_kwargs.get("down_lr_weight", None)
    mid = nw_kwargs.get("mid_lr_weight", None)
    up = nw_kwargs.get("up_lr_weight", None)
    if down is None and mid is None and up is None:
        return None

    def values(s, what):
        try:
            return [(float(v) if v.strip() else 0.0) for v in s.split(",")]
        except ValueError:
            raise UserError(f"network_args {what}: expected comma-separated numbers or a preset, got '{s}'") from None

    if down is not None and "," in down:
        down = values(down, "down_lr_weight")
    if mid is not None:
        mid = values(mid, "mid_lr_weight")
    if up is not None and "," in up:
        up = values(up, "up_lr_weight")
    try:
        threshold = float(nw_kwargs.get("block_lr_zero_threshold", 0.0))
    except ValueError:
        raise UserError("network_args block_lr_zero_threshold must be a number") from None
    return get_block_lr_weight(is_sdxl, down, mid, up, threshold)


def remove_block_dims_and_alphas(is_sdxl, block_dims, block_alphas, conv_block_dims, conv_block_alphas,
                                 block_lr_weight):
    if block_lr_weight is not None:
        for i, lr in enumerate(block_lr_weight):
            if lr == 0:
                block_dims[i] = 0
                if conv_block_dims is not None:
                    conv_block_dims[i] = 0
    return block_dims, block_alphas, conv_block_dims, conv_block_alphas
