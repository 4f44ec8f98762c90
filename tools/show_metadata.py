"""Print a LoRA's or checkpoint's metadata as JSON (kohya's ``tools/show_metadata.py``).

    python tools/show_metadata.py --model my_lora.safetensors

The ``__metadata__`` of a ``.safetensors`` file (only its header is read, so a 7 GB checkpoint is instant),
or the metadata this port stores in a MindSpore ``.ckpt``, printed with sorted keys and an indent of 4 as
kohya does. A file without metadata prints "No metadata found" (on stderr, exit status 0, as kohya).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (CPU runtime env before mindspore loads)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import run_main  # noqa: E402


def setup_parser():
    p = ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--model", type=str, required=True, help=".safetensors file (or a MindSpore .ckpt LoRA)")
    return p


def read_metadata(path):
    from library.lora_file import file_kind, load_state_dict_file, read_safetensors_metadata
    from library.path_utils import check_input_file

    check_input_file(path, "a .safetensors file")
    if file_kind(path) == "safetensors":
        return read_safetensors_metadata(path)
    return load_state_dict_file(path)[1]


def main(argv=None):
    args = setup_parser().parse_args(argv)
    metadata = read_metadata(args.model)
    if not metadata:
        print("No metadata found", file=sys.stderr)
        return
    print(json.dumps(metadata, indent=4, sort_keys=True))


if __name__ == "__main__":
    run_main(main)
