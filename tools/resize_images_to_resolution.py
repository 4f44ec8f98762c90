"""kohya's ``tools/resize_images_to_resolution.py``: copies of a folder's images at most a given area
(aspect ratio kept), for each of several maximum resolutions.

    python tools/resize_images_to_resolution.py src_images dst_images --max_resolution 1024x1024,512x512 \\
        --divisible_by 8 --save_as_png --copy_associated_files

For each image ``<name>.<ext>`` and each ``WxH`` of ``--max_resolution`` (in the order given), kohya's
steps: when the image has more than W*H pixels it is scaled by sqrt(W*H / pixels) (each side rounded
down); both sides are then rounded down to a multiple of ``--divisible_by`` by a centred crop; the
result is saved as ``<name>+WxH.jpg`` (JPEG quality 100) or ``.png`` with ``--save_as_png``. As in
kohya, each resolution starts from the previous one's result (give them largest first). Images are
converted to RGB. ``--interpolation``: area (default when shrinking, PIL's box filter here, see
Limitations.md), cubic, lanczos4, nearest, linear or box.

Other files of the source folder (captions...) are copied unchanged, as kohya does; with
``--copy_associated_files`` each image's files ``<name>.*`` are also copied as ``<name>+WxH.<ext>``,
one per resolution, so captions follow their images. Sub-folders are not entered.

Differences from kohya, on purpose: kohya's current code passes the height where the width belongs to
its resize helper, which transposes and mis-crops non-square images; sizes here are what its
arithmetic (and its earlier versions) give. Extensions are recognised in any case (``.PNG``). Every
image is decoded before anything is written, so a corrupt image stops the run with its name and an
empty destination; each output file is written whole or not at all.
"""
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (project runtime env; keeps the script pattern of tools/)
from library.arg_utils import ArgumentParser, one_line_errors  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INTERPOLATIONS = {"area": "area", "cubic": "cubic", "lanczos4": "lanczos", "nearest": "nearest", "linear": "linear",
                  "box": "box"}


def parse_max_resolutions(text: str):
    """'512x512,384x384' -> [('512x512', 262144), ...] (kohya keeps the text for the file names)."""
    out = []
    for item in (r.strip() for r in text.split(",")):
        parts = item.split("x")
        try:
            w, h = (int(p) for p in parts)
        except ValueError:
            w = h = 0
        if len(parts) != 2 or w < 1 or h < 1:
            raise UserError(f"--max_resolution {text!r}: {item!r} is not WIDTHxHEIGHT (e.g. 512x512)")
        out.append((item, w * h))
    return out


def plan_sizes(width: int, height: int, max_resolutions, divisible_by: int):
    """kohya's arithmetic for one image -> [(resolution text, size after scaling (w, h) or None when it
    is not scaled, size after the crop (w, h))], each step from the previous step's result."""
    plan = []
    for name, max_pixels in max_resolutions:
        resized = None
        if height * width > max_pixels:
            scale = math.sqrt(max_pixels / (height * width))
            resized = (int(width * scale), int(height * scale))
            width, height = resized
        width -= width % divisible_by
        height -= height % divisible_by
        plan.append((name, resized, (width, height)))
    return plan


def resize_to_resolutions(img, max_resolutions, divisible_by: int, interpolation=None):
    """One HWC image -> [(resolution text, image)] by ``plan_sizes``: scaled, then centre-cropped."""
    from library.image_utils import resize_image

    results = []
    for name, resized, (width, height) in plan_sizes(img.shape[1], img.shape[0], max_resolutions, divisible_by):
        if resized is not None:
            img = resize_image(img, img.shape[1], img.shape[0], resized[0], resized[1], interpolation)
        y = (img.shape[0] - height) // 2
        x = (img.shape[1] - width) // 2
        img = img[y:y + height, x:x + width]
        results.append((name, img))
    return results


def resize_images(src_img_folder, dst_img_folder, max_resolution="512x512", divisible_by=2, interpolation=None,
                  save_as_png=False, copy_associated_files=False):
    """kohya's function (same arguments); returns the names of the files written."""
    import glob

    from PIL import Image
    from tqdm import tqdm

    from library.dataset_check import check_image_file
    from library.image_utils import get_image_size, load_image
    from library.path_utils import atomic_write, check_output_folder, make_output_folder

    max_resolutions = parse_max_resolutions(max_resolution)
    if divisible_by < 1:
        raise UserError(f"--divisible_by must be >= 1, got {divisible_by}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise UserError(f"--interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    if not os.path.isdir(src_img_folder):
        raise UserError(f"src_img_folder {src_img_folder}: "
                        f"{'not a folder' if os.path.exists(src_img_folder) else 'folder not found'}")
    if os.path.exists(dst_img_folder) and os.path.samefile(src_img_folder, dst_img_folder):
        raise UserError(f"dst_img_folder {dst_img_folder} is the source folder: choose another folder")
    check_output_folder(dst_img_folder, "dst_img_folder")

    names = sorted(n for n in os.listdir(src_img_folder) if os.path.isfile(os.path.join(src_img_folder, n)))
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    others = [n for n in names if n not in images]
    problems = []
    for name in images:
        path = os.path.join(src_img_folder, name)
        problem = check_image_file(path)
        if not problem:
            for res, _, size in plan_sizes(*get_image_size(path), max_resolutions, divisible_by):
                if min(size) < 1:
                    problem = f"{path}: nothing is left of the image at {res} with --divisible_by {divisible_by}"
                    break
        if problem:
            problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    make_output_folder(dst_img_folder, "dst_img_folder")

    def copy(src, dst_name):
        atomic_write(os.path.join(dst_img_folder, dst_name), lambda tmp: shutil.copyfile(src, tmp))
        written.append(dst_name)

    written = []
    for name in others:
        copy(os.path.join(src_img_folder, name), name)
    method = INTERPOLATIONS.get(interpolation) if interpolation else None
    for name in tqdm(images, desc="resizing", unit="img", dynamic_ncols=True):
        base = os.path.splitext(name)[0]
        img = load_image(os.path.join(src_img_folder, name))
        for res, out in resize_to_resolutions(img, max_resolutions, divisible_by, method):
            out_name = f"{base}+{res}{'.png' if save_as_png else '.jpg'}"

            def save(tmp, out=out, fmt="PNG" if save_as_png else "JPEG"):
                Image.fromarray(out).save(tmp, format=fmt, quality=100)

            atomic_write(os.path.join(dst_img_folder, out_name), save)
            written.append(out_name)
        if copy_associated_files:
            for path in sorted(glob.glob(os.path.join(glob.escape(src_img_folder), glob.escape(base) + ".*"))):
                ext = os.path.splitext(path)[1]
                if ext.lower() in IMAGE_EXTENSIONS or not os.path.isfile(path):
                    continue
                for res, _ in max_resolutions:
                    copy(path, f"{base}+{res}{ext}")
    return written


def setup_parser():
    parser = one_line_errors(ArgumentParser(description=__doc__))
    parser.add_argument("src_img_folder", type=str, help="Source folder containing the images")
    parser.add_argument("dst_img_folder", type=str, help="Destination folder to save the resized images")
    parser.add_argument("--max_resolution", type=str, default="512x512,384x384,256x256,128x128",
                        help='Maximum resolution(s) in the format "512x512,384x384, etc, etc"')
    parser.add_argument("--divisible_by", type=int, default=1,
                        help="Ensure new dimensions are divisible by this value")
    parser.add_argument("--interpolation", type=str, default=None, choices=list(INTERPOLATIONS),
                        help="Interpolation method for resizing (default: area, as the images only shrink)")
    parser.add_argument("--save_as_png", action="store_true", help="Save as png format")
    parser.add_argument("--copy_associated_files", action="store_true",
                        help="Copy files with same base name to images (captions etc)")
    return parser


def main(argv=None):
    args = setup_parser().parse_args(argv)
    written = resize_images(args.src_img_folder, args.dst_img_folder, args.max_resolution, args.divisible_by,
                            args.interpolation, args.save_as_png, args.copy_associated_files)
    print(f"wrote {len(written)} file(s) to {args.dst_img_folder}")
    return written


if __name__ == "__main__":
    run_main(main)
