"""Output file names of a training run (kohya's train_util) and the loss-curve PNG."""


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


def stale_number(number, every, last_n, by_steps):
    """"Keep the last N" (--save_last_n_steps/--save_last_n_epochs and their _state forms): when the file of
    step or epoch ``number`` is saved (one every ``every``), the number whose file falls out, or None. Steps
    as kohya's get_remove_step_no (rounded down to a saved step), epochs as its epoch branch."""
    if last_n is None:
        return None
    if by_steps:
        stale = number - last_n - 1
        stale -= stale % every
    else:
        stale = number - every * last_n
    return stale if stale > 0 else None


def nice_ticks(lo, hi, count=5):
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart) covering [lo, hi], about ``count`` of them."""
    import math

    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v = first + len(ticks) * step
    return ticks


def write_loss_curve_png(path, losses, width=640, height=360):
    """Loss per step (grey) and its moving average (blue) as a PNG, drawn with PIL; the x axis is labelled in
    training steps (the first loss is step 1), the y axis with several loss values."""
    from PIL import Image, ImageDraw

    from library.path_utils import atomic_write

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    if len(losses) >= 1:
        import numpy as np

        y = np.asarray(losses, np.float64)
        k = max(1, len(y) // 10)
        avg = np.convolve(y, np.ones(k) / k, mode="valid")
        lo, hi = float(y.min()), float(y.max())
        hi = hi if hi > lo else lo + 1e-8
        left, right, top, bottom = 64, 16, 28, 36  # room for the y labels on the left, x labels below
        n = len(y)

        def pt(i, v):
            return (left + (width - left - right) * (i / max(1, n - 1)),
                    height - bottom - (height - top - bottom) * (v - lo) / (hi - lo))

        d.rectangle([left, top, width - right, height - bottom], outline="black")
        for v in nice_ticks(lo, hi, 6):
            ty = pt(0, v)[1]
            d.line([left - 4, ty, left, ty], fill="black")
            d.line([left, ty, width - right, ty], fill=(230, 230, 230))
            d.text((4, ty - 6), f"{v:.4g}", fill="black")
        for step in nice_ticks(1, n, 8):
            if step != int(step):
                continue
            tx = pt(step - 1, lo)[0]
            d.line([tx, height - bottom, tx, height - bottom + 4], fill="black")
            label = f"{int(step)}"
            d.text((tx - 3 * len(label), height - bottom + 6), label, fill="black")
        d.text((width // 2 - 12, height - 14), "step", fill="black")
        d.line([pt(i, v) for i, v in enumerate(y)] if n > 1 else [pt(0, y[0])] * 2, fill=(160, 160, 160), width=1)
        off = (n - len(avg)) / 2
        d.line([pt(i + off, v) for i, v in enumerate(avg)] if len(avg) > 1 else [pt(off, avg[0])] * 2,
               fill=(30, 80, 220), width=2)
        d.text((left, 8), f"loss per step ({n} steps), moving average of {k}", fill="black")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
