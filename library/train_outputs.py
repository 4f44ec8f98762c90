"""Output file names of a training run (kohya's train_util) and the loss-curve PNG."""
import os


# ---------------------------------------------------------------------------------------------
# file names (kohya's train_util)

EPOCH_FILE_NAME = "{}-{:06d}"
STEP_FILE_NAME = "{}-step{:08d}"


def get_epoch_ckpt_name(args, ext, epoch_no):
    return EPOCH_FILE_NAME.format(args.output_name, epoch_no) + ext


def get_step_ckpt_name(args, ext, step_no):
    return STEP_FILE_NAME.format(args.output_name, step_no) + ext


def get_last_ckpt_name(args, ext):
    return args.output_name + ext


def write_loss_curve_png(path, losses, width=640, height=360):
    """Loss per step (grey) and its moving average (blue) as a PNG, drawn with PIL."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    if len(losses) >= 1:
        import numpy as np

        y = np.asarray(losses, np.float64)
        k = max(1, len(y) // 10)
        avg = np.convolve(y, np.ones(k) / k, mode="valid")
        lo, hi = float(y.min()), float(y.max())
        hi = hi if hi > lo else lo + 1e-8
        m = 40

        def pt(i, v, n):
            return (m + (width - 2 * m) * (i / max(1, n - 1)), height - m - (height - 2 * m) * (v - lo) / (hi - lo))

        d.rectangle([m, m, width - m, height - m], outline="black")
        d.line([pt(i, v, len(y)) for i, v in enumerate(y)], fill=(160, 160, 160), width=1)
        off = (len(y) - len(avg)) / 2
        d.line([pt(i + off, v, len(y)) for i, v in enumerate(avg)], fill=(30, 80, 220), width=2)
        d.text((m, 8), f"loss per step ({len(y)} steps), moving average of {k}", fill="black")
        d.text((4, m - 12), f"{hi:.4g}", fill="black")
        d.text((4, height - m), f"{lo:.4g}", fill="black")
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
