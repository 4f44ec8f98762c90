"""U-Net key conversion between diffusers' ``UNet2DConditionModel`` names and the original SAI/SGM layout
used by ``sdxl_original_unet`` (and by the ``model.diffusion_model.*`` keys of the single-file checkpoints,
prefix stripped). The mapping is derived from the keys themselves (number of levels, resnets per level,
which blocks have attention), so tiny test configurations of the SDXL topology convert as well as SDXL
base. Values are passed through unchanged (same shapes in both layouts when ``use_linear_projection`` is
on). ``library.sdxl_model_util`` re-exports the two conversions under kohya's names."""
import re

from library.sdxl_checkpoint_keys import rename_prefix

# diffusers resnet sub-module -> SGM ResBlock sub-module
_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)

_TOP_LEVEL = (
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
)


def _block_prefix_pairs(num_levels, num_res_blocks, up_has_attention):
    """(diffusers prefix, SGM prefix, is_resnet) for every block of the topology.

    ``up_has_attention[i]``: whether diffusers' up_blocks.i has attentions (decides
    whether its upsampler sits at index 1 or 2 of its SGM output block).
    """
    r = num_res_blocks
    pairs = []
    for i in range(num_levels):
        for j in range(r):
            n = 1 + i * (r + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.", True))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.", False))
        if i < num_levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (r + 1)}.0.op.", False))
        for j in range(r + 1):
            n = i * (r + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.", True))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.", False))
        if i < num_levels - 1:
            slot = 2 if up_has_attention[i] else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (r + 1) + r}.{slot}.", False))
    pairs.append(("mid_block.resnets.0.", "middle_block.0.", True))
    pairs.append(("mid_block.attentions.0.", "middle_block.1.", False))
    pairs.append(("mid_block.resnets.1.", "middle_block.2.", True))
    return pairs


def _convert(sd, pairs, to_sgm):
    out = {}
    unmapped = []
    for key, value in sd.items():
        new_key = rename_prefix(key, _TOP_LEVEL, reverse=not to_sgm)
        if new_key is None:
            for du, sgm, is_resnet in pairs:
                src, dst = (du, sgm) if to_sgm else (sgm, du)
                if key.startswith(src):
                    rest = key[len(src):]
                    if is_resnet:
                        rest = rename_prefix(rest, _RESNET_RENAMES, reverse=not to_sgm) or rest
                    new_key = dst + rest
                    break
        if new_key is None:
            unmapped.append(key)
            continue
        out[new_key] = value
    if unmapped:
        layout = "diffusers" if to_sgm else "SDXL (SGM)"
        raise ValueError(f"{len(unmapped)} UNet keys are not in the {layout} layout: {unmapped[:5]}")
    return out


def _indices(keys, pattern):
    return {int(m.group(1)) for m in (re.match(pattern, k) for k in keys) if m}


def convert_diffusers_unet_state_dict_to_sdxl(du_sd):
    """diffusers UNet2DConditionModel state dict (SDXL topology) -> SGM/kohya names."""
    keys = list(du_sd)
    levels = _indices(keys, r"down_blocks\.(\d+)\.")
    if not levels:
        raise ValueError("not a diffusers UNet state dict: no down_blocks.* keys")
    num_levels = max(levels) + 1
    num_res = max(_indices(keys, r"down_blocks\.\d+\.resnets\.(\d+)\.")) + 1
    up_attn = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(num_levels)]
    return _convert(du_sd, _block_prefix_pairs(num_levels, num_res, up_attn), to_sgm=True)


def convert_sdxl_unet_state_dict_to_diffusers(sd):
    """SGM/kohya SDXL UNet state dict (no ``model.diffusion_model.`` prefix) -> diffusers names."""
    keys = list(sd)
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    if not blocks:
        raise ValueError("not an SDXL UNet state dict: no input_blocks.* keys")
    num_levels = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\.")) + 1
    num_input = max(blocks) + 1  # conv_in + levels * (res blocks + 1) - 1
    num_res = num_input // num_levels - 1
    # an upsampler is at slot 2 after a transformer, at slot 1 otherwise
    up_attn = [any(k.startswith(f"output_blocks.{i * (num_res + 1) + num_res}.2.conv.") for k in keys)
               for i in range(num_levels)]
    return _convert(sd, _block_prefix_pairs(num_levels, num_res, up_attn), to_sgm=False)
