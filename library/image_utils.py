"""Image files for the datasets: discovery, loading, resizing, trimming,
normalisation and kohya's colour augmentation.

kohya resizes with OpenCV (``INTER_AREA`` when shrinking, PIL's Lanczos when
enlarging). We use PIL only: ``area`` maps to PIL's BOX filter, which equals
OpenCV's ``INTER_AREA`` for integer reduction factors and is close
otherwise (see Limitations.md).
"""
from __future__ import annotations

import glob
import os
import random
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from library.bucket_manager import BucketManager
from library.device_utils import UserError

IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]

# Decoded images above this many pixels are refused (decompression bombs):
# PIL's own warning threshold (about 89.5 megapixels, e.g. 9459 x 9459).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}


def validate_interpolation_fn(name: str) -> bool:
    return name in INTERPOLATIONS


def glob_images(directory: str, base: str = "*") -> List[str]:
    """Image files (kohya's extensions) directly in ``directory``, sorted."""
    paths = set()
    for ext in IMAGE_EXTENSIONS:
        if base == "*":
            paths.update(glob.glob(os.path.join(glob.escape(directory), base + ext)))
        else:
            paths.update(glob.glob(glob.escape(os.path.join(directory, base + ext))))
    return sorted(paths)


def get_image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the file header; UserError naming the path when unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from e


def load_image(path: str, alpha: bool = False) -> np.ndarray:
    """HWC uint8 array, RGB (or RGBA with ``alpha``); UserError naming the path on failure."""
    try:
        with Image.open(path) as im:
            mode = "RGBA" if alpha else "RGB"
            if im.mode != mode:
                im = im.convert(mode)
            return np.array(im, np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot load image {path}: {e}") from e


def resize_image(image: np.ndarray, width: int, height: int, resized_width: int, resized_height: int,
                 resize_interpolation: Optional[str] = None) -> np.ndarray:
    """Resize an HWC uint8 image; the default is ``area`` when shrinking, else ``lanczos`` (kohya)."""
    width, height, resized_width, resized_height = int(width), int(height), int(resized_width), int(resized_height)
    if resize_interpolation is None:
        resize_interpolation = "area" if (width >= resized_width and height >= resized_height) else "lanczos"
    size, resample = (resized_width, resized_height), _PIL_FILTERS[resize_interpolation]
    if image.ndim == 3 and image.shape[2] == 4:
        # RGB + a mask channel (alpha, or a conditioning_data_dir mask): resized channel by channel as
        # OpenCV does; PIL would premultiply RGBA by alpha and blacken the colours where the mask is 0
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, :3])).resize(size, resample))
        mask = np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, 3])).resize(size, resample))
        return np.dstack([rgb, mask])
    return np.asarray(Image.fromarray(image).resize(size, resample))


def trim_and_resize_if_required(random_crop: bool, image: np.ndarray, reso: Tuple[int, int],
                                resized_size: Tuple[int, int], resize_interpolation: Optional[str] = None):
    """Resize to ``resized_size`` and trim to the bucket ``reso`` (centre, or random
    with ``random_crop``). -> (image, original size (w, h), crop ltrb) as kohya."""
    image_height, image_width = image.shape[:2]
    original_size = (image_width, image_height)
    if image_width != resized_size[0] or image_height != resized_size[1]:
        image = resize_image(image, image_width, image_height, resized_size[0], resized_size[1],
                             resize_interpolation)
    image_height, image_width = image.shape[:2]
    if image_width > reso[0]:
        trim = image_width - reso[0]
        p = random.randint(0, trim) if random_crop else trim // 2
        image = image[:, p:p + reso[0]]
    if image_height > reso[1]:
        trim = image_height - reso[1]
        p = random.randint(0, trim) if random_crop else trim // 2
        image = image[p:p + reso[1]]
    # kohya reports the centred crop even with random_crop (no better definition exists)
    crop_ltrb = BucketManager.get_crop_ltrb(reso, original_size)
    if image.shape[0] != reso[1] or image.shape[1] != reso[0]:
        raise RuntimeError(f"internal error: trimmed size {image.shape[1]}x{image.shape[0]} != bucket {reso}")
    return image, original_size, crop_ltrb


def to_chw_float(image: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32 in [-1, 1] (torchvision ToTensor + Normalize(0.5, 0.5))."""
    x = image.astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - 0.5) / 0.5).transpose(2, 0, 1))


def color_aug(image: np.ndarray) -> np.ndarray:
    """kohya's weak colour augmentation: with probability 0.33, either a hue shift
    of up to +-8 (OpenCV's 0..180 hue scale) or a gamma in [0.95, 1.05] applied
    to the 0..255 values, half the time each."""
    hue_shift_limit = 8
    if random.random() <= 0.33:
        if random.random() > 0.5:
            hue_shift = random.uniform(-hue_shift_limit, hue_shift_limit)
            if hue_shift < 0:
                hue_shift = 180 + hue_shift
            hsv = np.array(Image.fromarray(image).convert("HSV"), dtype=np.float32)
            # PIL's hue is 0..255 for 0..360 degrees; OpenCV's is 0..180
            hsv[:, :, 0] = np.round(((hsv[:, :, 0] * 180.0 / 256.0 + hue_shift) % 180) * 256.0 / 180.0) % 256
            image = np.array(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
        else:
            gamma = random.uniform(0.95, 1.05)
            image = np.clip(image.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    return image
