"""Convert LoRA weights between MindSpore ``.ckpt`` and kohya ``.safetensors``.

    python tools/convert_weights.py --input lora.safetensors --output lora.ckpt
    python tools/convert_weights.py --input lora.ckpt --output lora.safetensors

Tensors keep their names (kohya's ``lora_unet_...`` keys), values and dtypes
(fp32/fp16/bf16) bit for bit, and the safetensors metadata (``ss_*``,
``sshs_*``, ``modelspec.*``) is carried in the ``.ckpt`` (as one JSON string
entry, ``__metadata__``) and back, so ``safetensors -> ckpt -> safetensors``
reproduces the original file byte for byte. torch-pickled ``.ckpt``/``.pt``
LoRAs (torch kohya's ``--save_model_as ckpt``) are read as input too.
``--save_precision`` casts on the way; ``--convert_keys`` renames diffusers/PEFT
keys to kohya's (needs ``--sdxl_config`` to know the UNet layout: ``base``).
Errors are one line naming the file; the output is written atomically.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (environment before mindspore)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402
from library.lora_file import cast_array, load_state_dict_file, normalize_dtype, save_state_dict_file  # noqa: E402

OUTPUT_EXTS = (".safetensors", ".ckpt")


def setup_parser():
    parser = ArgumentParser(description="LoRA weights: MindSpore .ckpt <-> kohya .safetensors")
    parser.add_argument("--input", required=True, help=".safetensors, MindSpore .ckpt or torch .ckpt/.pt LoRA")
    parser.add_argument("--output", required=True, help="output file, .safetensors or .ckpt")
    parser.add_argument("--save_precision", default=None, choices=[None, "float", "fp16", "bf16"],
                        help="cast every tensor (default: keep each tensor's dtype)")
    parser.add_argument("--convert_keys", action="store_true",
                        help="rename diffusers/PEFT SDXL LoRA keys to kohya's lora_unet_/lora_te1_/lora_te2_ names")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def _sdxl_unet_skeleton():
    """SDXL base UNet structure with 1-element parameters (key mapping needs the layout, not the weights)."""
    from mindspore import Parameter, Tensor
    import numpy as np

    from library import layers
    from library.sdxl_original_unet import SdxlUNet2DConditionModel

    original = layers._param
    layers._param = lambda shape, bound=None, fill=None, name=None: Parameter(Tensor(np.zeros((1,), np.float32)),
                                                                               name=name)
    try:
        return SdxlUNet2DConditionModel()
    finally:
        layers._param = original


def convert(input_path, output_path, save_precision=None, convert_keys=False, overwrite=False):
    ext = os.path.splitext(output_path)[1].lower()
    if ext not in OUTPUT_EXTS:
        raise UserError(f"{output_path}: output must end in .safetensors or .ckpt")
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise UserError(f"{output_path}: output is the input file")
    if os.path.exists(output_path) and not overwrite:
        raise UserError(f"{output_path}: exists (pass --overwrite to replace it)")
    tensors, metadata, dtypes = load_state_dict_file(input_path)
    if not tensors:
        raise UserError(f"{input_path}: holds no tensors")
    if convert_keys:
        from networks.lora import convert_diffusers_to_sai_if_needed
        convert_diffusers_to_sai_if_needed(tensors, _sdxl_unet_skeleton(), dtypes)
    precision = normalize_dtype(save_precision)
    if precision is not None:
        tensors = {k: cast_array(v, precision) for k, v in tensors.items()}
        dtypes = {k: precision for k in tensors}
    save_state_dict_file(output_path, tensors, metadata or None, dtypes)
    return len(tensors)


def main(argv=None):
    args = setup_parser().parse_args(argv)
    n = convert(args.input, args.output, args.save_precision, args.convert_keys, args.overwrite)
    print(f"wrote {n} tensors to {args.output}")


if __name__ == "__main__":
    run_main(main)
