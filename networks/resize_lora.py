"""Lower a LoRA's rank by SVD (kohya's ``networks/resize_lora.py``, numpy, no torch).

    python networks/resize_lora.py --model my_lora.safetensors --save_to my_lora_r16.safetensors --new_rank 16
    python networks/resize_lora.py --model my_lora.safetensors --save_to my_lora_dyn.safetensors \\
        --new_rank 64 --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Every module's ``lora_up @ lora_down`` is decomposed and its first singular triplets kept: ``--new_rank`` for
Linear modules, ``--new_conv_rank`` (default ``--new_rank``) for conv modules. The alpha keeps the module's
scale: ``new_alpha = alpha / old_rank * new_rank``. With ``--dynamic_method`` each module gets its own rank,
at most ``--new_rank`` (kohya's rules: ``sv_ratio`` keeps the singular values above max/param, ``sv_cumulative``
those whose cumulative sum reaches param of the total, ``sv_fro`` those whose cumulative squared sum reaches
param**2 of the squared Frobenius norm, each plus one). Metadata as kohya writes it: ``ss_training_comment``
("dimension is resized from ..." or "Dynamic resize with ..."), ``ss_network_dim``/``ss_network_alpha``
(the new rank and the last module's alpha, or "Dynamic"), ``sshs_*`` hashes of the new tensors.
kohya's ``lora_down/lora_up``, PEFT's ``lora_A/lora_B`` and ControlLoRA's ``down/up`` names are read.

Every tensor of the file is written in ``--save_precision`` (float if omitted), as kohya does. Difference from
kohya: a fixed ``--new_rank`` (or an explicit ``--new_conv_rank``) larger than every rank of its kind in the
file stops with a message (kohya pads the LoRA with empty directions).
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (CPU runtime env before mindspore loads)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402
from library.lora_tool_io import (PRECISIONS, add_device_argument, check_device, check_input_file,  # noqa: E402
                                  check_lora_factors, run_tool, check_save_to, dtype_name, save_lora)

logger = logging.getLogger(__name__)

LORA_DOWN_UP_FORMATS = [
    ("lora_down", "lora_up"),  # sd-scripts LoRA
    ("lora_A", "lora_B"),  # PEFT LoRA
    ("down", "up"),  # ControlLoRA
]


def setup_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    p.add_argument("--save_precision", type=str, default=None, choices=PRECISIONS,
                   help="precision of the saved file (float if omitted)")
    p.add_argument("--new_rank", type=int, default=4,
                   help="rank of the output LoRA (with --dynamic_method: the largest rank a module may get)")
    p.add_argument("--new_conv_rank", type=int, default=None,
                   help="rank of the output LoRA's conv modules (default: --new_rank)")
    p.add_argument("--save_to", type=str, default=None, help="output file: .safetensors or .ckpt")
    p.add_argument("--model", type=str, default=None, help="LoRA to resize: .safetensors, .ckpt or torch .pt")
    add_device_argument(p)
    p.add_argument("--verbose", action="store_true",
                   help="print each module's retained sum(S), Frobenius norm and max(S) ratio")
    p.add_argument("--dynamic_method", type=str, default=None, choices=["sv_ratio", "sv_fro", "sv_cumulative"],
                   help="choose each module's rank from its singular values; --new_rank is the largest rank")
    p.add_argument("--dynamic_param", type=float, default=None, help="target of --dynamic_method")
    return p


def check_args(args):
    check_input_file(args.model, "--model")
    check_save_to(args.save_to, [args.model])
    check_device(args.device)
    if args.new_rank < 1:
        raise UserError(f"--new_rank {args.new_rank}: give a rank of 1 or more")
    if args.new_conv_rank is not None and args.new_conv_rank < 1:
        raise UserError(f"--new_conv_rank {args.new_conv_rank}: give a rank of 1 or more")
    if args.dynamic_method and not args.dynamic_param:
        raise UserError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param (a target above 0)")
    if args.dynamic_param is not None and not args.dynamic_method:
        raise UserError("--dynamic_param is used only with --dynamic_method (sv_ratio, sv_fro or sv_cumulative)")
    if args.dynamic_param is not None and args.dynamic_param <= 0:
        raise UserError(f"--dynamic_param {args.dynamic_param}: give a target above 0")


# ---------------------------------------------------------------------------


def find_modules(lora_sd):
    """[(module, down key, up key, alpha key)] in kohya's order (sorted keys, as safetensors lists them)."""
    modules = []
    for key in sorted(lora_sd):
        parts = key.split(".")
        found = None
        for down_name, up_name in LORA_DOWN_UP_FORMATS:
            # only the last two parts: "down"/"up" also occur inside module names
            if len(parts) >= 2 and parts[-2] == down_name:
                found = (".".join(parts[:-2]), "." + down_name, "." + up_name, "." + parts[-1])
                break
            if parts[-1] == down_name:
                found = (".".join(parts[:-1]), "." + down_name, "." + up_name, "")
                break
        if found is None:
            continue
        block, down_name, up_name, weight_name = found
        modules.append((block, block + down_name + weight_name, block + up_name + weight_name, block + ".alpha"))
    return modules


def _check_modules(modules, lora_sd, path):
    if not modules:
        raise UserError(f"{path}: not a LoRA (no lora_down/lora_up, lora_A/lora_B or down/up weights)")
    for block, down_key, up_key, _ in modules:
        check_lora_factors(path, block, lora_sd, down_key, up_key)


def check_ranks(modules, lora_sd, path, new_rank, new_conv_rank, conv_rank_given, dynamic):
    """A fixed rank larger than every rank of its kind in the file would only pad the LoRA: refused."""
    linear = [lora_sd[d].shape[0] for _, d, _, _ in modules if lora_sd[d].ndim == 2]
    conv = [lora_sd[d].shape[0] for _, d, _, _ in modules if lora_sd[d].ndim == 4]
    if dynamic:
        return
    if linear and new_rank > max(linear):
        raise UserError(f"{path}: --new_rank {new_rank} is larger than the LoRA's rank ({max(linear)}); "
                        "resizing lowers the rank")
    if conv and new_conv_rank > max(conv):
        if conv_rank_given or not linear:
            raise UserError(f"{path}: --new_conv_rank {new_conv_rank} is larger than the rank of the LoRA's conv "
                            f"modules ({max(conv)}); resizing lowers the rank")
        logger.warning("the conv modules have rank %d, below --new_conv_rank %d (which defaults to --new_rank): "
                       "as kohya, they get rank %d with empty extra directions; pass --new_conv_rank %d to keep "
                       "their rank", max(conv), new_conv_rank, new_conv_rank, max(conv))


def resize_module(up, down, alpha, new_rank, dynamic_method=None, dynamic_param=None):
    """kohya's resize of one module: -> (lora_up, lora_down, param dict of ``rank_resize``)."""
    import numpy as np

    from library import lora_svd

    old_rank = down.shape[0]
    # kohya: alpha (a float32 tensor) / old rank, in float32; no alpha: 1.0
    scale = 1.0 if alpha is None else np.float32(np.asarray(alpha, np.float32).reshape(-1)[0]) / np.float32(old_rank)
    up2d, down2d = lora_svd.lora_factors_2d(up, down)
    u, s, vh = lora_svd.product_svd(up2d, down2d)
    width = min(up2d.shape[0], down2d.shape[1])
    s_full = np.zeros(width)
    s_full[:len(s)] = s  # kohya ranks the full SVD's singular values; those past the product's rank are 0
    param = lora_svd.rank_resize(s_full, new_rank, dynamic_method, dynamic_param, scale)
    k = min(param["new_rank"], width)
    if k != param["new_rank"]:  # a rank wider than the layer (kohya fails here)
        param.update(new_rank=k, new_alpha=lora_svd.scaled_alpha(scale, k))
    if k > len(s):  # directions beyond the product's rank: LAPACK's completion, as kohya
        u, s, vh = lora_svd.full_svd(up2d @ down2d)
    new_up, new_down = lora_svd.split_top(u, s, vh, k)
    if down.ndim == 4:
        new_up = new_up.reshape(up.shape[0], k, 1, 1)
        new_down = new_down.reshape(k, *down.shape[1:])
    return new_up, new_down, param


def resize_lora_model(lora_sd, new_rank, new_conv_rank, save_dtype, dynamic_method, dynamic_param, verbose,
                      modules=None):
    """kohya's ``resize_lora_model`` on numpy arrays: -> (state dict, max old rank, the last module's alpha).
    ``save_dtype``: 'fp32'/'fp16'/'bf16' (the arrays are rounded to it; the caller records the dtype)."""
    import numpy as np
    from tqdm import tqdm

    from library.lora_file import cast_array

    if dynamic_method:
        logger.info("dynamically determining new alphas and dims based off %s: %s, max rank is %s", dynamic_method,
                    dynamic_param, new_rank)
    modules = find_modules(lora_sd) if modules is None else modules
    out = dict(lora_sd)
    max_old_rank, new_alpha = None, None
    lines, fro_list = ["\n"], []
    for block, down_key, up_key, alpha_key in tqdm(modules, desc="resizing", unit="module"):
        down, up = lora_sd[down_key], lora_sd[up_key]
        conv2d = down.ndim == 4
        max_old_rank = max(max_old_rank or 0, down.shape[0])
        new_up, new_down, param = resize_module(up, down, lora_sd.get(alpha_key), new_conv_rank if conv2d
                                                else new_rank, dynamic_method, dynamic_param)
        if verbose:
            if not np.isnan(param["fro_retained"]):
                fro_list.append(param["fro_retained"])
            line = (f"{block:75} | sum(S) retained: {param['sum_retained']:.1%}, fro retained: "
                    f"{param['fro_retained']:.1%}, max(S) ratio: {param['max_ratio']:0.1f}")
            if dynamic_method:
                line += f", dynamic | dim: {param['new_rank']}, alpha: {param['new_alpha']}"
            lines.append(line + "\n")
        new_alpha = param["new_alpha"]
        out[down_key] = cast_array(new_down, save_dtype)
        out[up_key] = cast_array(new_up, save_dtype)
        out[alpha_key] = cast_array(np.asarray(new_alpha, np.float32), save_dtype)
    if verbose:
        print("".join(lines))
        print(f"Average Frobenius norm retention: {np.mean(fro_list):.2%} | std: {np.std(fro_list):0.3f}")
    logger.info("resizing complete")
    return out, max_old_rank, new_alpha


def resize(args):
    import numpy as np

    from library.lora_file import cast_array, load_state_dict_file

    conv_rank_given = args.new_conv_rank is not None
    args.new_conv_rank = args.new_conv_rank if conv_rank_given else args.new_rank
    save_dtype = dtype_name(args.save_precision) or "fp32"

    logger.info("loading %s", args.model)
    tensors, metadata, _ = load_state_dict_file(args.model)
    # kohya loads every tensor as float32 (its SVD works in float32)
    lora_sd = {k: np.asarray(v).astype(np.float32) for k, v in tensors.items()}
    modules = find_modules(lora_sd)
    _check_modules(modules, lora_sd, args.model)
    check_ranks(modules, lora_sd, args.model, args.new_rank, args.new_conv_rank, conv_rank_given,
                bool(args.dynamic_method))

    state_dict, old_dim, new_alpha = resize_lora_model(lora_sd, args.new_rank, args.new_conv_rank, save_dtype,
                                                       args.dynamic_method, args.dynamic_param, args.verbose, modules)
    metadata = dict(metadata or {})
    comment = metadata.get("ss_training_comment", "")
    if not args.dynamic_method:
        conv_desc = "" if args.new_rank == args.new_conv_rank else f" (conv: {args.new_conv_rank})"
        metadata["ss_training_comment"] = (f"dimension is resized from {old_dim} to {args.new_rank}{conv_desc}; "
                                           f"{comment}")
        metadata["ss_network_dim"] = str(args.new_rank)
        metadata["ss_network_alpha"] = str(new_alpha)
    else:
        metadata["ss_training_comment"] = (f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from "
                                           f"{old_dim}; {comment}")
        metadata["ss_network_dim"] = "Dynamic"
        metadata["ss_network_alpha"] = "Dynamic"
    state_dict = {k: cast_array(v, save_dtype) for k, v in state_dict.items()}
    dtypes = {k: save_dtype for k in state_dict}
    save_lora(args.save_to, state_dict, metadata, dtypes)


def main(argv=None):
    run_tool(setup_parser, check_args, resize, argv)


if __name__ == "__main__":
    run_main(main)
