"""Inputs and outputs shared by the LoRA tools that run between trainings (``networks/resize_lora.py``,
``networks/svd_merge_lora.py``, ``networks/extract_lora_from_models.py``): argument checks made before any
work starts, and the output write (kohya's ``sshs_*`` hashes, folder created on write and removed again
if the write fails, the file itself written atomically by ``library.lora_file``)."""
import logging
import os

from library.device_utils import UserError
from library.lora_file import normalize_dtype, save_state_dict_file
from library.path_utils import (check_input_file as check_file, check_output_folder, make_output_folder,
                                remove_empty_folders)

logger = logging.getLogger(__name__)

PRECISIONS = ("float", "fp16", "bf16")
OUTPUT_EXTS = (".safetensors", ".ckpt")


def add_device_argument(parser):
    """kohya's ``--device`` (a torch device): the tools compute with numpy on the CPU, so only ``cpu`` is taken."""
    parser.add_argument("--device", type=str, default=None,
                        help="kohya's torch device; this port computes with numpy on the CPU: only 'cpu' is taken")


def check_device(value, option="--device"):
    if value is not None and value.lower() != "cpu":
        raise UserError(f"{option} {value}: this port computes with numpy on the CPU; leave {option} out "
                        "(or give cpu)")


def check_input_file(path, option):
    if not path:
        raise UserError(f"{option} is required")
    check_file(path, label=option)


def check_models_and_ratios(args):
    """``--models`` given, one ``--ratios`` value per model (default 1 each), ``--lbws`` refused: the merge
    tools' shared checks. Returns the ratios."""
    if not args.models:
        raise UserError("--models: give at least one LoRA file")
    ratios = list(args.ratios) if args.ratios else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise UserError(f"--ratios: {len(ratios)} ratio(s) for {len(args.models)} model(s); give one per model")
    if getattr(args, "lbws", None):
        raise UserError("--lbws (layer-block weights) is not implemented in this port")
    return ratios


def check_save_to(path, inputs=()):
    """``--save_to``: given, a .safetensors/.ckpt file name, not one of the inputs, in a folder that can be
    written (it is created when the file is written)."""
    if not path:
        raise UserError("--save_to is required (output .safetensors or .ckpt file)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in OUTPUT_EXTS:
        raise UserError(f"--save_to {path}: unsupported extension '{ext}' (use .safetensors, or .ckpt for a "
                        "MindSpore checkpoint)")
    if os.path.isdir(path):
        raise UserError(f"--save_to {path}: is a folder; give the output file name")
    for source in inputs:
        if source and os.path.exists(source) and os.path.abspath(source) == os.path.abspath(path):
            raise UserError(f"--save_to {path}: is an input file; write the result to another file")
    check_output_folder(os.path.dirname(os.path.abspath(path)), f"--save_to {path}: output folder")


def dtype_name(precision):
    """kohya's precision names (float/fp16/bf16, None) -> lora_file's (fp32/fp16/bf16, None)."""
    return normalize_dtype(precision)


def save_lora(path, state_dict, metadata, dtypes=None):
    """Write a LoRA as kohya's tools do: ``sshs_model_hash``/``sshs_legacy_hash`` of the tensors with the
    ``ss_*`` metadata added to ``metadata``, then the file (atomically; its folder created here and removed
    again if the write fails)."""
    from library.lora_metadata import precalculate_safetensors_hashes

    model_hash, legacy_hash = precalculate_safetensors_hashes(state_dict, metadata, dtypes)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    created = make_output_folder(os.path.dirname(os.path.abspath(path)), "--save_to")
    try:
        save_state_dict_file(path, state_dict, metadata or None, dtypes)
    except BaseException:
        remove_empty_folders(created)
        raise
    logger.info("saved %s", path)


def run_tool(setup_parser, check_args, work, argv=None):
    """A LoRA tool's ``main``: parse, log to the console, check every argument before any file is read,
    then ``work(args)``."""
    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_args(args)
    return work(args)


def check_lora_factors(path, module, lora_sd, down_key, up_key):
    """-> (down, up) of one LoRA module of the file ``path``; one line when its up weight is missing or the two
    are not the factors of one module."""
    if up_key not in lora_sd:
        raise UserError(f"{path}: module {module} has {down_key} but no {up_key}")
    down, up = lora_sd[down_key], lora_sd[up_key]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.reshape(up.shape[0], -1).shape[1] != down.shape[0]:
        raise UserError(f"{path}: module {module}: lora_up {list(up.shape)} and lora_down {list(down.shape)} are "
                        "not the two factors of one LoRA module")
    return down, up
