"""Merge SDXL LoRAs (kohya's ``networks/sdxl_merge_lora.py``, MindSpore, no torch).

Into a checkpoint (``--sd_model``): every LoRA is added to the weights with its ratio,
``W += ratio * alpha/dim * up @ down`` (kohya's formula, conv 3x3 included), and the SAI single-file
checkpoint is written to ``--save_to`` (``.safetensors`` or MindSpore ``.ckpt``).

Into one LoRA (no ``--sd_model``):

* default: kohya's merge. Each weight is scaled by ``sqrt(alpha/base_alpha) * ratio`` (``abs`` for
  ``lora_up``), summed across LoRAs of the same rank, and the first LoRA's alpha is kept. This is an
  approximation (sum of products != product of sums) and a ratio r acts as ``r*|r|``, as in kohya.
* ``--concat``: exact rank concatenation. Module by module the output has rank ``sum(dim_i)`` and
  ``alpha = rank`` (scale 1), with ``c_i = ratio_i * alpha_i / dim_i`` split as
  ``sign(c_i) sqrt|c_i|`` on ``lora_down`` and ``sqrt|c_i|`` on ``lora_up``, so the merged LoRA at
  multiplier 1 equals the LoRAs applied together with their ratios. (kohya's ``--concat`` keeps the first
  alpha with the summed rank and squares the ratio, which is not exact.)

Merging is computed in float32; ``--precision`` is the dtype the merged weights are rounded to and the
default of ``--save_precision``. ``--lbws`` (layer-block weights) is not implemented and stops at start.
A LoRA module that the model does not have, or a shape that does not fit, stops with one line (kohya logs
and skips it).
"""
import argparse
import logging
import math
import os
import sys
import time
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (CPU runtime env before mindspore loads)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import UserError, add_device_arguments, run_main, setup_device_from_args  # noqa: E402
from library.dtypes import canonical  # noqa: E402
from library.lora_tool_io import check_models_and_ratios  # noqa: E402
from library.path_utils import check_output_folder, make_output_folder, remove_empty_folders  # noqa: E402

logger = logging.getLogger(__name__)

PRECISIONS = ("float", "fp16", "bf16")


def setup_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save_precision", type=str, default=None, choices=PRECISIONS,
                   help="precision of the saved file (default: --precision)")
    p.add_argument("--precision", type=str, default="float", choices=PRECISIONS,
                   help="precision of the merged weights (merging itself is computed in float32)")
    p.add_argument("--sd_model", type=str, default=None,
                   help="SDXL checkpoint (SAI .safetensors/.ckpt or diffusers folder) to merge into; "
                        "merge the LoRAs into one LoRA if omitted")
    p.add_argument("--save_to", type=str, default=None, help="output file: .safetensors or .ckpt")
    p.add_argument("--models", type=str, nargs="*", default=[], help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", default=None,
                   help="ratio of each LoRA (default 1.0 each)")
    p.add_argument("--lbws", type=str, nargs="*", default=None,
                   help="layer-block weights per LoRA (kohya): not implemented in this port")
    p.add_argument("--no_metadata", action="store_true",
                   help="do not save sai modelspec metadata (the minimum ss_ metadata of a LoRA is kept)")
    p.add_argument("--concat", action="store_true",
                   help="concatenate ranks instead of summing (exact; the output rank is the sum of the ranks)")
    p.add_argument("--shuffle", action="store_true", help="shuffle the rank order of the merged LoRA")
    add_device_arguments(p)
    return p


# ---------------------------------------------------------------------------
# checks


def check_args(args):
    if not args.save_to:
        raise UserError("--save_to is required (output .safetensors or .ckpt file)")
    ext = os.path.splitext(args.save_to)[1].lower()
    if ext not in (".safetensors", ".ckpt"):
        raise UserError(f"{args.save_to}: unsupported extension '{ext}' (use .safetensors or .ckpt)")
    args.ratios = check_models_and_ratios(args)
    if args.sd_model is not None and args.concat:
        raise UserError("--concat merges LoRAs into one LoRA; it cannot be used with --sd_model")
    if args.sd_model is not None and args.shuffle:
        raise UserError("--shuffle applies to a merged LoRA; it cannot be used with --sd_model")
    if args.sd_model is not None and not os.path.exists(args.sd_model):
        raise UserError(f"{args.sd_model}: checkpoint not found")
    for m in args.models:
        if not os.path.isfile(m):
            raise UserError(f"{m}: LoRA file not found")
    if os.path.isdir(args.save_to):
        raise UserError(f"--save_to {args.save_to}: is a folder; give the output file name")
    # the folder is created when the merged file is written (as training and inference do)
    check_output_folder(os.path.dirname(os.path.abspath(args.save_to)), f"--save_to {args.save_to}: output folder")


def _dtype_name(precision):
    return None if precision is None else canonical(precision)


# ---------------------------------------------------------------------------
# merging into a checkpoint


def merge_to_sd_model(text_encoder1, text_encoder2, unet, models, ratios, merge_dtype=None):
    """Add each LoRA or LoHa (ratio as multiplier) to the models' weights, in order (kohya's function name)."""
    from networks.network_base import create_network_from_weights_file as create_network_from_weights

    for model, ratio in zip(models, ratios):
        logger.info("merging %s (ratio %s)", model, ratio)
        network, weights_sd = create_network_from_weights(ratio, model, None, [text_encoder1, text_encoder2], unet,
                                                          for_inference=True)
        network.merge_to([text_encoder1, text_encoder2], unet, weights_sd, dtype=merge_dtype)


# ---------------------------------------------------------------------------
# merging LoRAs together


def _modules(sd, file):
    """{module: {"down", "up", "alpha"}} as float32 numpy."""
    import numpy as np

    out = OrderedDict()
    for key, value in sd.items():
        name, _, leaf = key.partition(".")
        entry = out.setdefault(name, {})
        if leaf == "lora_down.weight":
            entry["down"] = np.asarray(value, np.float32)
        elif leaf == "lora_up.weight":
            entry["up"] = np.asarray(value, np.float32)
        elif leaf == "alpha":
            entry["alpha"] = float(np.asarray(value, np.float32).reshape(-1)[0])
        else:
            raise UserError(f"{file}: '{key}' is not a LoRA weight (expected .lora_down.weight, .lora_up.weight, "
                            ".alpha)")
    for name, e in out.items():
        if "down" not in e or "up" not in e:
            raise UserError(f"{file}: module {name} lacks lora_{'down' if 'down' not in e else 'up'}.weight")
        e.setdefault("alpha", float(e["down"].shape[0]))
    return out


def merge_lora_models(models, ratios, merge_dtype=None, concat=False, shuffle=False, seed=None):
    """-> (state dict of numpy float32 arrays, minimum ss_ metadata) of the merged LoRA (kohya's function)."""
    import numpy as np

    from library.lora_metadata import build_minimum_network_metadata
    from networks.lora import load_lora_weights_file

    merged = OrderedDict()   # module -> {"down", "up", "alpha"} (kohya) or lists of parts (concat)
    base_model = None
    for model, ratio in zip(models, ratios):
        logger.info("loading %s", model)
        sd, metadata, _ = load_lora_weights_file(model)
        if metadata and base_model is None:
            base_model = metadata.get("ss_base_model_version")
        for name, e in _modules(sd, model).items():
            dim = e["down"].shape[0]
            if concat:
                c = ratio * e["alpha"] / dim
                m = merged.setdefault(name, {"down": [], "up": []})
                if m["down"] and m["down"][0].shape[1:] != e["down"].shape[1:]:
                    raise UserError(f"{model}: module {name} has lora_down shape {e['down'].shape}, which does not "
                                    f"fit {m['down'][0].shape} of the LoRAs before it")
                m["down"].append(np.float32(math.copysign(math.sqrt(abs(c)), c)) * e["down"])
                m["up"].append(np.float32(math.sqrt(abs(c))) * e["up"])
                continue
            m = merged.get(name)
            base_alpha = e["alpha"] if m is None else m["alpha"]
            scale = math.sqrt(e["alpha"] / base_alpha) * ratio
            down, up = e["down"] * np.float32(scale), e["up"] * np.float32(abs(scale))
            if m is None:
                merged[name] = {"down": down, "up": up, "alpha": base_alpha}
                continue
            for part, value in (("down", down), ("up", up)):
                if m[part].shape != value.shape:
                    raise UserError(f"{model}: module {name} lora_{part} has shape {value.shape}, the LoRAs before it "
                                    f"{m[part].shape}: different ranks merge only with --concat")
                m[part] = m[part] + value
    rng = np.random.default_rng(seed)
    state_dict = OrderedDict()
    dims, alphas = set(), set()
    for name, m in merged.items():
        if concat:
            down = np.concatenate(m["down"], 0)
            up = np.concatenate(m["up"], 1)
            alpha = float(down.shape[0])
        else:
            down, up, alpha = m["down"], m["up"], m["alpha"]
        if shuffle:
            perm = rng.permutation(down.shape[0])
            down, up = down[perm], up[:, perm]
        state_dict[name + ".lora_down.weight"] = np.ascontiguousarray(down, np.float32)
        state_dict[name + ".lora_up.weight"] = np.ascontiguousarray(up, np.float32)
        state_dict[name + ".alpha"] = np.asarray(alpha, np.float32)
        dims.add(down.shape[0])
        alphas.add(alpha)
    if merge_dtype is not None:
        from library.lora_file import cast_array
        for key in state_dict:
            state_dict[key] = cast_array(state_dict[key], merge_dtype)
    dim = str(dims.pop()) if len(dims) == 1 else "Dynamic"
    alpha = f"{alphas.pop()}" if len(alphas) == 1 else "Dynamic"
    metadata = build_minimum_network_metadata(None, base_model, "networks.lora", dim, alpha, None)
    return state_dict, metadata


# ---------------------------------------------------------------------------


def merge(args):
    from library.lora_metadata import build_modelspec_metadata

    merge_dtype = _dtype_name(args.precision)
    save_dtype = _dtype_name(args.save_precision) or merge_dtype
    title = os.path.splitext(os.path.basename(args.save_to))[0]
    if args.sd_model is not None:
        from library.sdxl_model_util import load_models_from_sdxl_checkpoint, save_stable_diffusion_checkpoint

        logger.info("loading SD model: %s", args.sd_model)
        te1, te2, vae, unet, logit_scale, ckpt_info = load_models_from_sdxl_checkpoint(args.sd_model)
        merge_to_sd_model(te1, te2, unet, args.models, args.ratios,
                          None if merge_dtype == "fp32" else merge_dtype)
        metadata = None
        if not args.no_metadata:
            merged_from = ", ".join(os.path.splitext(os.path.basename(m))[0] for m in [args.sd_model] + args.models)
            metadata = build_modelspec_metadata(sdxl=True, lora=False, timestamp=time.time(), title=title,
                                                merged_from=merged_from)
        logger.info("saving SD model to %s", args.save_to)
        _save(args.save_to, lambda: save_stable_diffusion_checkpoint(args.save_to, te1, te2, unet, 0, 0, ckpt_info, vae,
                                                                     logit_scale, metadata, save_dtype))
        return
    from library.lora_file import cast_array, save_state_dict_file
    from library.lora_metadata import precalculate_safetensors_hashes

    state_dict, metadata = merge_lora_models(args.models, args.ratios, merge_dtype, args.concat, args.shuffle)
    dtypes = None
    if save_dtype is not None:
        for key in state_dict:
            state_dict[key] = cast_array(state_dict[key], save_dtype)
        dtypes = {k: save_dtype for k in state_dict}
    if args.save_to.lower().endswith(".safetensors"):
        model_hash, legacy_hash = precalculate_safetensors_hashes(state_dict, metadata, dtypes)
        metadata["sshs_model_hash"] = model_hash
        metadata["sshs_legacy_hash"] = legacy_hash
    if not args.no_metadata:
        merged_from = ", ".join(os.path.splitext(os.path.basename(m))[0] for m in args.models)
        metadata.update(build_modelspec_metadata(sdxl=True, lora=True, timestamp=time.time(), title=title,
                                                 merged_from=merged_from))
    logger.info("saving merged LoRA to %s", args.save_to)
    _save(args.save_to, lambda: save_state_dict_file(args.save_to, state_dict, metadata, dtypes))


def _save(path, write):
    """Create the output folder, then ``write()``; a folder this created is removed again if the write fails."""
    created = make_output_folder(os.path.dirname(os.path.abspath(path)), "--save_to")
    try:
        write()
    except BaseException:
        remove_empty_folders(created)
        raise


def main(argv=None):
    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_args(args)
    if args.sd_model is not None:
        setup_device_from_args(args)
    merge(args)


if __name__ == "__main__":
    run_main(main)
