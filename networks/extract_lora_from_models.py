"""Extract a LoRA from the difference of a fine-tuned SDXL checkpoint and its base (kohya's
``networks/extract_lora_from_models.py``, numpy, no torch).

    python networks/extract_lora_from_models.py --sdxl --model_org sd_xl_base_1.0.safetensors \\
        --model_tuned my_finetune.safetensors --dim 64 --conv_dim 16 --save_to my_finetune_lora.safetensors

For every module kohya's LoRA network would wrap (U-Net transformers; with ``--conv_dim`` also the ResBlocks
and resamplers; the text encoders' attention and MLP layers), the difference ``W_tuned - W_org`` is
decomposed and its first ``--dim`` singular triplets kept (``--conv_dim`` for 3x3 convolutions; never more
than the layer's width): ``lora_up = U*S``, ``lora_down = Vh``, clamped to +-the ``--clamp_quantile`` of their
values, ``alpha`` = the rank (scale 1). The text encoders are extracted only when some text-encoder weight
differs by more than ``--min_diff`` (kohya's rule); otherwise the LoRA is U-Net only. Metadata as kohya:
``ss_network_dim``/``ss_network_alpha``/``ss_network_args``, ``ss_base_model_version``, ``sshs_*`` hashes and,
unless ``--no_metadata``, ModelSpec keys.

The checkpoints are SAI single files (``.safetensors`` or a MindSpore ``.ckpt``), read one tensor at a time:
two full-size SDXL checkpoints never sit in memory, only the two weights of the module at hand. SDXL only
(``--sdxl``, as kohya's command line for SDXL); diffusers folders are not read.
"""
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (CPU runtime env before mindspore loads)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402
from library.lora_tool_io import (PRECISIONS, add_device_argument, check_device, check_input_file,  # noqa: E402
                                  run_tool, check_save_to, dtype_name, save_lora)

logger = logging.getLogger(__name__)

MODEL_VERSION_SDXL_BASE_V1_0 = "sdxl_base_v1-0"


def setup_parser():
    p = ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--v2", action="store_true", help="Stable Diffusion 2.x models (kohya): not supported in this port")
    p.add_argument("--v_parameterization", action="store_true", default=None,
                   help="mark the LoRA's metadata as v-parameterization (default: as --v2)")
    p.add_argument("--sdxl", action="store_true", help="the models are SDXL (required: this port reads SDXL only)")
    p.add_argument("--load_precision", type=str, default=None, choices=PRECISIONS,
                   help="round the models' weights to this precision when loaded (default: as stored)")
    p.add_argument("--save_precision", type=str, default=None, choices=PRECISIONS,
                   help="precision of the saved file (float if omitted)")
    p.add_argument("--model_org", type=str, default=None, required=True,
                   help="the original (base) SDXL checkpoint: SAI .safetensors or MindSpore .ckpt")
    p.add_argument("--model_tuned", type=str, default=None, required=True,
                   help="the tuned SDXL checkpoint; the LoRA is the difference original -> tuned")
    p.add_argument("--save_to", type=str, default=None, required=True, help="output file: .safetensors or .ckpt")
    p.add_argument("--dim", type=int, default=4, help="rank of the LoRA")
    p.add_argument("--conv_dim", type=int, default=None,
                   help="rank of the LoRA for 3x3 convolutions (default: no conv modules)")
    add_device_argument(p)
    p.add_argument("--clamp_quantile", type=float, default=0.99, help="quantile to clamp the factors' values to, (0-1]")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="the text encoders are extracted when some weight differs by more than this")
    p.add_argument("--no_metadata", action="store_true",
                   help="do not save sai modelspec metadata (the minimum ss_ metadata of a LoRA is kept)")
    p.add_argument("--load_original_model_to", type=str, default=None,
                   help="kohya's device for the original model; only 'cpu' here")
    p.add_argument("--load_tuned_model_to", type=str, default=None,
                   help="kohya's device for the tuned model; only 'cpu' here")
    return p


def check_args(args):
    if args.v2:
        raise UserError("--v2: this port extracts from SDXL checkpoints only (pass --sdxl)")
    if not args.sdxl:
        raise UserError("this port extracts from SDXL checkpoints only: pass --sdxl (as kohya's command line for "
                        "SDXL models)")
    for option, path in (("--model_org", args.model_org), ("--model_tuned", args.model_tuned)):
        if path and os.path.isdir(path):
            raise UserError(f"{option} {path}: is a folder; this tool reads SDXL single-file checkpoints "
                            "(.safetensors or MindSpore .ckpt), not diffusers folders")
        check_input_file(path, option)
    if os.path.abspath(args.model_org) == os.path.abspath(args.model_tuned):
        raise UserError(f"--model_org and --model_tuned are the same file ({args.model_org})")
    check_save_to(args.save_to, [args.model_org, args.model_tuned])
    check_device(args.device)
    check_device(args.load_original_model_to, "--load_original_model_to")
    check_device(args.load_tuned_model_to, "--load_tuned_model_to")
    if args.dim < 1:
        raise UserError(f"--dim {args.dim}: give a rank of 1 or more")
    if args.conv_dim is not None and args.conv_dim < 1:
        raise UserError(f"--conv_dim {args.conv_dim}: give a rank of 1 or more")
    if not 0 < args.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {args.clamp_quantile}: give a value in (0, 1]")


# ---------------------------------------------------------------------------


def _shapes(reader):
    return {k: reader.shape(k) for k in reader.keys()}


def find_targets(org, tuned, conv):
    """(text encoder targets, U-Net targets) of ``org``; every file key they read must be in ``tuned`` with the
    same shape (else the two files are not the same model)."""
    from library.sdxl_lora_targets import text_encoder_targets, unet_targets

    org_shapes, tuned_shapes = _shapes(org), _shapes(tuned)
    unet = unet_targets(org_shapes, conv)
    if not unet:
        raise UserError(f"{org.path}: not an SDXL checkpoint in the single-file (SAI) layout (no "
                        "model.diffusion_model.*.transformer_blocks.* weights)")
    te = text_encoder_targets(org_shapes)
    for _, key, _, _ in te + unet:
        if key not in tuned_shapes:
            raise UserError(f"{tuned.path}: has no {key}, which {org.path} has: the two checkpoints are not the "
                            "same model")
        if tuple(tuned_shapes[key]) != tuple(org_shapes[key]):
            raise UserError(f"{tuned.path}: {key} has shape {list(tuned_shapes[key])}, {org.path} "
                            f"{list(org_shapes[key])}: the two checkpoints are not the same model")
    return te, unet


class _Weights:
    """One module's weight from a reader, as float32 (rounded to ``--load_precision`` when given); the last
    file tensor is kept, as q, k and v of text encoder 2 are thirds of one tensor."""

    def __init__(self, reader, load_dtype):
        self.reader, self.load_dtype = reader, load_dtype
        self._key, self._array = None, None

    def get(self, key, op):
        import numpy as np

        from library.lora_file import cast_array
        from library.sdxl_lora_targets import apply_op

        if key != self._key:
            self._key, self._array = None, None
            a = np.asarray(self.reader.get(key), np.float32)
            if self.load_dtype is not None:
                a = np.asarray(cast_array(a, self.load_dtype), np.float32)
            self._key, self._array = key, a
        return apply_op(self._array, op)


def module_diff(w_org, w_tuned, load_dtype):
    """``W_tuned - W_org`` as kohya computes it: in the models' dtype, then float32."""
    import numpy as np

    from library.lora_file import cast_array

    diff = w_tuned - w_org
    if load_dtype is not None:
        diff = cast_array(diff, load_dtype)
    return np.asarray(diff, np.float32)


def extract_module(diff, rank, clamp_quantile):
    """kohya's SVD of one module's difference -> (lora_up, lora_down) in the module's shapes, float32."""
    from library import lora_svd

    out_dim, in_dim = diff.shape[0], diff.shape[1]
    rank = min(rank, in_dim, out_dim)  # never wider than the layer
    u, s, vh = lora_svd.gram_top_svd(lora_svd.flatten_weight(diff), rank)
    up, down = lora_svd.split_top(u, s, vh, rank)
    up, down = lora_svd.clamp_factors(up, down, clamp_quantile)
    return lora_svd.to_module_shapes(up, down, diff.shape)


def svd(args):
    import numpy as np
    from tqdm import tqdm

    from library.lora_file import cast_array
    from library.lora_metadata import build_modelspec_metadata
    from library.safetensors_io import open_weights

    load_dtype = dtype_name(args.load_precision)
    save_dtype = dtype_name(args.save_precision)
    v2 = bool(args.v2)
    v_parameterization = v2 if args.v_parameterization is None else bool(args.v_parameterization)
    with open_weights(args.model_org) as org, open_weights(args.model_tuned) as tuned:
        te_targets, unet_targets = find_targets(org, tuned, args.conv_dim is not None)
        w_org, w_tuned = _Weights(org, load_dtype), _Weights(tuned, load_dtype)

        # kohya's rule: the text encoders are extracted when any of their target weights differs by more than
        # --min_diff; checked first, so that an unchanged text encoder costs reads, not decompositions
        different = False
        for name, key, op, _ in tqdm(te_targets, desc="comparing text encoders", unit="module"):
            biggest = float(np.max(np.abs(module_diff(w_org.get(key, op), w_tuned.get(key, op), load_dtype))))
            if biggest > args.min_diff:
                logger.info("Text encoder is different. %s > %s (%s)", biggest, args.min_diff, name)
                different = True
                break
        if not different:
            logger.warning("Text encoder is same. Extract U-Net only.")
        targets = (te_targets if different else []) + unet_targets

        lora_sd = {}
        for name, key, op, shape in tqdm(targets, desc="extracting", unit="module"):
            diff = module_diff(w_org.get(key, op), w_tuned.get(key, op), load_dtype)
            conv3x3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
            rank = args.conv_dim if conv3x3 and args.conv_dim is not None else args.dim
            up, down = extract_module(diff, rank, args.clamp_quantile)
            lora_sd[name + ".lora_up.weight"] = up
            lora_sd[name + ".lora_down.weight"] = down
            lora_sd[name + ".alpha"] = np.asarray(down.shape[0], np.float32)  # alpha = rank: scale 1
            del diff

    net_kwargs = {}
    if args.conv_dim is not None:
        net_kwargs["conv_dim"] = str(args.conv_dim)
        net_kwargs["conv_alpha"] = str(float(args.conv_dim))
    metadata = {
        "ss_v2": str(v2),
        "ss_base_model_version": MODEL_VERSION_SDXL_BASE_V1_0,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.dim),
        "ss_network_alpha": str(float(args.dim)),
        "ss_network_args": json.dumps(net_kwargs),
    }
    if not args.no_metadata:
        title = os.path.splitext(os.path.basename(args.save_to))[0]
        metadata.update(build_modelspec_metadata(v2=v2, v_parameterization=v_parameterization, sdxl=True, lora=True,
                                                 timestamp=time.time(), title=title))
    dtypes = None
    if save_dtype is not None:
        lora_sd = {k: cast_array(v, save_dtype) for k, v in lora_sd.items()}
        dtypes = {k: save_dtype for k in lora_sd}
    logger.info("saving LoRA to %s", args.save_to)
    save_lora(args.save_to, lora_sd, metadata, dtypes)


def main(argv=None):
    run_tool(setup_parser, check_args, svd, argv)


if __name__ == "__main__":
    run_main(main)
