"""Merge LoRAs of any ranks into one LoRA of a chosen rank by SVD (kohya's ``networks/svd_merge_lora.py``,
numpy, no torch).

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.5 \\
        --new_rank 32 --save_to merged.safetensors

As kohya: each module's delta ``sum_i ratio_i * alpha_i/dim_i * up_i @ down_i`` (conv 3x3 included) is
decomposed, the first ``--new_rank`` (conv 3x3: ``--new_conv_rank``, default ``--new_rank``; never more than
the layer's width) singular triplets are kept as ``lora_up = U*S``, ``lora_down = Vh``, both clamped to
+-the 0.99 quantile of their values, and ``alpha`` = the module's rank (an int64 scalar, as kohya writes it).
Metadata: kohya's minimum ``ss_*`` keys (``ss_network_dim``/``ss_network_alpha`` = ``--new_rank``,
``ss_network_args`` with the conv rank), ``sshs_*`` hashes and, unless ``--no_metadata``, ModelSpec keys
with ``merged_from``.

``--precision`` rounds the input LoRAs to that precision as kohya loads them (the decomposition itself is
computed in float64) and is the default of ``--save_precision``. ``--lbws`` (layer-block weights) is not
implemented and stops at start.
"""
import logging
import os
import sys
import time
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (CPU runtime env before mindspore loads)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402
from library.lora_tool_io import (PRECISIONS, add_device_argument, check_device, check_input_file,  # noqa: E402
                                  check_lora_factors, check_models_and_ratios, check_save_to, dtype_name, run_tool,
                                  save_lora)

logger = logging.getLogger(__name__)


def setup_parser():
    p = ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--save_precision", type=str, default=None, choices=PRECISIONS,
                   help="precision of the saved file (default: --precision)")
    p.add_argument("--precision", type=str, default="float", choices=PRECISIONS,
                   help="precision the input LoRAs are rounded to when loaded (float is recommended)")
    p.add_argument("--save_to", type=str, default=None, help="output file: .safetensors or .ckpt")
    p.add_argument("--models", type=str, nargs="*", default=[], help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", default=None, help="ratio of each LoRA (default 1.0 each)")
    p.add_argument("--lbws", type=str, nargs="*", default=None,
                   help="layer-block weights per LoRA (kohya): not implemented in this port")
    p.add_argument("--new_rank", type=int, default=4, help="rank of the output LoRA")
    p.add_argument("--new_conv_rank", type=int, default=None,
                   help="rank of the output LoRA's conv 3x3 modules (default: --new_rank)")
    add_device_argument(p)
    p.add_argument("--no_metadata", action="store_true",
                   help="do not save sai modelspec metadata (the minimum ss_ metadata of a LoRA is kept)")
    return p


def check_args(args):
    args.ratios = check_models_and_ratios(args)
    for m in args.models:
        check_input_file(m, "--models")
    check_save_to(args.save_to, args.models)
    check_device(args.device)
    if args.new_rank < 1:
        raise UserError(f"--new_rank {args.new_rank}: give a rank of 1 or more")
    if args.new_conv_rank is not None and args.new_conv_rank < 1:
        raise UserError(f"--new_conv_rank {args.new_conv_rank}: give a rank of 1 or more")


# ---------------------------------------------------------------------------


def _lora_modules(lora_sd, path):
    """{module: (up, down, alpha)} of the ``*.lora_down*`` keys (kohya's rule), float32 numpy."""
    import numpy as np

    modules = OrderedDict()
    for key in sorted(lora_sd):
        if "lora_down" not in key:
            continue
        name = key[:key.rfind(".lora_down")]
        up_key = name + ".lora_up.weight"
        down, up = check_lora_factors(path, name, lora_sd, key, up_key)
        alpha = lora_sd.get(name + ".alpha")
        alpha = float(down.shape[0]) if alpha is None else float(np.asarray(alpha, np.float32).reshape(-1)[0])
        modules[name] = (up, down, alpha)
    if not modules:
        raise UserError(f"{path}: not a LoRA (no *.lora_down.weight keys)")
    return modules


def merge_lora_models(models, ratios, new_rank, new_conv_rank, merge_dtype="fp32"):
    """kohya's ``merge_lora_models``: -> (state dict, minimum ss_ metadata, v2, base model version)."""
    import numpy as np
    from tqdm import tqdm

    from library import lora_svd
    from library.lora_file import cast_array, load_state_dict_file
    from library.lora_metadata import build_minimum_network_metadata

    logger.info("new rank: %s, new conv rank: %s", new_rank, new_conv_rank)
    parts = OrderedDict()    # module -> {"shape": (out, in, kh, kw) or (out, in), "ups": [...], "downs": [...]}
    sources = {}             # module -> file that set its shape
    v2 = base_model = None
    for model, ratio in zip(models, ratios):
        logger.info("loading: %s", model)
        tensors, metadata, _ = load_state_dict_file(model)
        lora_sd = {k: cast_array(np.asarray(v, np.float32), merge_dtype).astype(np.float32) for k, v in tensors.items()}
        if metadata:
            if v2 is None:
                v2 = metadata.get("ss_v2")
            if base_model is None:
                base_model = metadata.get("ss_base_model_version")
        for name, (up, down, alpha) in _lora_modules(lora_sd, model).items():
            dim = down.shape[0]
            shape = (up.shape[0],) + tuple(down.shape[1:])
            entry = parts.setdefault(name, {"shape": shape, "ups": [], "downs": []})
            sources.setdefault(name, model)
            if entry["shape"] != shape:
                raise UserError(f"{model}: module {name} is for a {list(shape)} weight, {sources[name]} for "
                                f"{list(entry['shape'])}: the LoRAs are not for the same model")
            up2d, down2d = lora_svd.lora_factors_2d(up, down)
            entry["ups"].append(up2d.astype(np.float64) * (ratio * alpha / dim))
            entry["downs"].append(down2d)

    logger.info("extract new lora...")
    merged = OrderedDict()
    for name, entry in tqdm(list(parts.items()), desc="merging", unit="module"):
        shape = entry["shape"]
        conv3x3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        out_dim, in_dim = shape[0], shape[1]
        k = min(new_conv_rank if conv3x3 else new_rank, in_dim, out_dim)  # never wider than the layer
        up_cat, down_cat = np.concatenate(entry["ups"], 1), np.concatenate(entry["downs"], 0)
        u, s, vh = lora_svd.product_svd(up_cat, down_cat)
        if k > len(s):  # more directions than the merged delta has: LAPACK's completion, as kohya
            u, s, vh = lora_svd.full_svd((up_cat @ down_cat.astype(np.float64)).astype(np.float32))
        up, down = lora_svd.split_top(u, s, vh, k)
        up, down = lora_svd.clamp_factors(up, down)
        up, down = lora_svd.to_module_shapes(up, down, shape)
        merged[name + ".lora_up.weight"] = up
        merged[name + ".lora_down.weight"] = down
        merged[name + ".alpha"] = np.asarray(k, np.int64)

    network_args = {"conv_dim": new_conv_rank, "conv_alpha": new_conv_rank}
    metadata = build_minimum_network_metadata(v2, base_model, "networks.lora", f"{new_rank}", f"{new_rank}",
                                              network_args)
    return merged, metadata, v2 == "True", base_model


def _title(path):
    """kohya's ``build_merged_from`` title: the file's ``modelspec.title``, else its name."""
    from library.lora_file import read_safetensors_metadata, file_kind

    title = None
    if file_kind(path) == "safetensors":
        title = read_safetensors_metadata(path).get("modelspec.title")
    return title if title is not None else os.path.splitext(os.path.basename(path))[0]


def merge(args):
    import numpy as np

    from library.lora_file import cast_array
    from library.lora_metadata import build_modelspec_metadata

    merge_dtype = dtype_name(args.precision)
    save_dtype = dtype_name(args.save_precision) or merge_dtype
    new_conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    state_dict, metadata, v2, base_model = merge_lora_models(args.models, args.ratios, args.new_rank, new_conv_rank,
                                                             merge_dtype)
    dtypes = {}
    for key, value in state_dict.items():
        if np.issubdtype(value.dtype, np.floating):  # kohya casts floating tensors only: alpha stays int64
            state_dict[key] = cast_array(value, save_dtype)
            dtypes[key] = save_dtype
    if not args.no_metadata:
        is_sdxl = base_model is not None and base_model.lower().startswith("sdxl")
        merged_from = ", ".join(_title(m) for m in args.models)
        title = os.path.splitext(os.path.basename(args.save_to))[0]
        if v2:
            logger.warning("cannot tell whether the LoRA is for v-prediction: metadata is saved as v-prediction, "
                           "as kohya does")
        # kohya adds the ModelSpec keys after the hashes, which use the ss_ keys only: same values either way
        metadata.update(build_modelspec_metadata(v2=v2, v_parameterization=v2, sdxl=is_sdxl, lora=True,
                                                 timestamp=time.time(), title=title, merged_from=merged_from))
    save_lora(args.save_to, state_dict, metadata, dtypes)


def main(argv=None):
    run_tool(setup_parser, check_args, merge, argv)


if __name__ == "__main__":
    run_main(main)
