"""Print each LoRA weight's shape and size statistics (kohya's ``networks/check_lora_weights.py``).

    python networks/check_lora_weights.py my_lora.safetensors [--show_all_keys]

One line per LoRA tensor (``lora_up``/``lora_down``, PEFT's ``lora_A``/``lora_B``, OFT's ``oft_*``), sorted by
name: ``key,(shape with - between sizes),mean(|w|),min(|w|)``, computed in float32. A tensor of all zeros
(``mean(|w|)`` 0) is a module that never trained. ``--show_all_keys`` adds the other tensors (alphas ...).
kohya prints the statistics as torch tensors (``tensor(0.0123)``); here they are plain numbers, and
``--show_all_keys`` lists each other tensor once (kohya's lists the LoRA tensors a second time).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (CPU runtime env before mindspore loads)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402

LORA_MARKERS = ("lora_up", "lora_down", "lora_A", "lora_B", "oft_")


def setup_parser():
    p = ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("file", type=str, help="LoRA file to check: .safetensors, MindSpore .ckpt or torch .pt")
    p.add_argument("-s", "--show_all_keys", action="store_true", help="also show the tensors that are not LoRA factors")
    return p


def shape_text(shape):
    """kohya's ``str(tuple(size)).replace(', ', '-')``: (4-320), (4-320-3-3), (4,) and () as Python prints them."""
    return str(tuple(int(s) for s in shape)).replace(", ", "-")


def weight_lines(tensors, show_all_keys=False):
    import numpy as np

    keys = sorted(tensors)
    selected = [k for k in keys if any(m in k for m in LORA_MARKERS)]
    lines = [f"number of LoRA modules: {len(selected)}"]
    if show_all_keys:
        selected += [k for k in keys if k not in set(selected)]
        lines.append(f"number of all modules: {len(selected)}")
    for key in selected:
        value = np.abs(np.asarray(tensors[key], np.float32))
        mean = float(np.mean(value)) if value.size else float("nan")
        low = float(np.min(value)) if value.size else float("nan")
        lines.append(f"{key},{shape_text(value.shape)},{mean:.8g},{low:.8g}")
    return lines


def main(argv=None):
    from library.lora_file import load_state_dict_file

    args = setup_parser().parse_args(argv)
    if not os.path.isfile(args.file):
        raise UserError(f"{args.file}: file not found" if not os.path.exists(args.file) else
                        f"{args.file}: is a folder, expected a LoRA file")
    print(f"loading: {args.file}", file=sys.stderr)
    tensors, _, _ = load_state_dict_file(args.file)
    for line in weight_lines(tensors, args.show_all_keys):
        print(line)


if __name__ == "__main__":
    run_main(main)
