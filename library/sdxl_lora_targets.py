"""kohya's LoRA modules of an SDXL single-file (SAI) checkpoint, found from its keys alone (no model is built).

``networks/lora.py`` names a module ``<prefix>_<path with _>`` for every Linear/Conv2d under kohya's target
classes. In the SAI layout that is:

* U-Net (``model.diffusion_model.``, SGM names = kohya's): every 2-D/4-D weight inside a spatial transformer
  (``<block>.proj_in``, ``<block>.transformer_blocks.N.attn1.to_q`` ...); with conv modules
  (``conv_dim``) also inside ResBlocks (``in_layers.2``, ``emb_layers.1``, ``out_layers.3``,
  ``skip_connection``), down-samplers (``op``) and up-samplers (``conv``) -> ``lora_unet_*``;
* text encoder 1 (``conditioner.embedders.0.transformer.``, transformers names): the ``self_attn`` q/k/v/out
  projections and ``mlp.fc1/fc2`` of each layer -> ``lora_te1_text_model_encoder_layers_N_*``;
* text encoder 2 (``conditioner.embedders.1.model.``, OpenCLIP names): the same modules under transformers
  names (``library.sdxl_checkpoint_keys.te2_load_plan``: q/k/v are thirds of ``attn.in_proj_weight``,
  ``mlp.c_fc`` is ``fc1``) -> ``lora_te2_*``.

A target is ``(lora name, file key, op, shape)`` with op ``("copy",)`` or ``("chunk", i, 3)``.
"""
import re

from library import sdxl_checkpoint_keys as K

_UNET_BLOCK = re.compile(r"^((?:input_blocks\.\d+|output_blocks\.\d+)\.\d+|middle_block\.\d+)\.(.+)\.weight$")
_TE_MODULE = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")


def _block_kind(block, unet_keys):
    if f"{block}.proj_in.weight" in unet_keys:
        return "transformer"
    if f"{block}.in_layers.2.weight" in unet_keys:
        return "resblock"
    if f"{block}.op.weight" in unet_keys:
        return "downsample"
    if f"{block}.conv.weight" in unet_keys:
        return "upsample"
    return None


def unet_targets(shapes, conv=False):
    """[(lora name, file key, op, shape)] of the U-Net; ``shapes``: {full file key: shape}."""
    unet_keys = {k[len(K.UNET_PREFIX):] for k in shapes if k.startswith(K.UNET_PREFIX)}
    targets = []
    for key in sorted(unet_keys):
        m = _UNET_BLOCK.match(key)
        shape = tuple(shapes[K.UNET_PREFIX + key])
        if not m or len(shape) not in (2, 4):
            continue
        kind = _block_kind(m.group(1), unet_keys)
        if kind is None or (kind != "transformer" and not conv):
            continue
        path = key[:-len(".weight")]
        targets.append(("lora_unet_" + path.replace(".", "_"), K.UNET_PREFIX + key, ("copy",), shape))
    return targets


def text_encoder_targets(shapes):
    """[(lora name, file key, op, shape)] of both text encoders (shape: the module's, after the op)."""
    targets = []
    te1 = sorted(k[len(K.TE1_PREFIX):] for k in shapes if k.startswith(K.TE1_PREFIX))
    for key in te1:
        if _TE_MODULE.match(key):
            name = "lora_te1_" + key[:-len(".weight")].replace(".", "_")
            targets.append((name, K.TE1_PREFIX + key, ("copy",), tuple(shapes[K.TE1_PREFIX + key])))
    te2 = [k[len(K.TE2_PREFIX):] for k in shapes if k.startswith(K.TE2_PREFIX)]
    plan, _ = K.te2_load_plan(te2)
    for param in sorted(plan):
        if _TE_MODULE.match(param):
            file_key, op = plan[param]
            shape = K.planned_shape(shapes[K.TE2_PREFIX + file_key], op)
            if shape is None:
                continue
            targets.append(("lora_te2_" + param[:-len(".weight")].replace(".", "_"), K.TE2_PREFIX + file_key, op,
                            tuple(shape)))
    return targets


def apply_op(array, op):
    """The module weight from the file tensor (``chunk``: the i-th of n equal parts of axis 0)."""
    if op[0] == "chunk":
        _, i, n = op
        step = array.shape[0] // n
        return array[i * step:(i + 1) * step]
    return array
