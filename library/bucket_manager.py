"""Aspect-ratio bucketing, as kohya's ``BucketManager`` (library/train_util.py)
and ``make_bucket_resolutions`` (library/model_util.py).

Bucket list (``make_bucket_resolutions``): for a maximum resolution
``(W, H)`` with area ``A = W * H`` and a step ``d``:

* the square ``s x s`` with ``s = floor(sqrt(A) / d) * d``;
* for every width ``w = min_size, min_size + d, ... <= max_size``:
  ``h = min(max_size, floor((A // w) / d) * d)``; if ``h >= min_size`` both
  ``(w, h)`` and ``(h, w)`` are buckets.

Selection (``select_bucket``), with upscaling allowed: an image whose size is
itself a bucket keeps it; otherwise the bucket with the smallest absolute
aspect-ratio error (first one on ties, in sorted order) is chosen and the
image is scaled so that it covers the bucket (``resized = int(x * scale +
0.5)``), the excess being cropped later. With ``bucket_no_upscale`` an
image larger than the maximum area is shrunk to that area keeping its aspect
ratio (the rounding of width or height to the step that errs least on the
aspect ratio), smaller images are not resized, and the bucket is the resized
size rounded down to the step.

Crop offsets (``get_crop_ltrb``) follow Stability AI's preprocessing, used for
SDXL's crop conditioning: the image fitted *inside* the bucket and centred.
"""
from __future__ import annotations

import math
import random
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


def make_bucket_resolutions(max_reso: Tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> List[Tuple[int, int]]:
    """kohya's bucket list for a maximum resolution (width, height), sorted."""
    max_width, max_height = max_reso
    max_area = max_width * max_height

    resos = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))

    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible

    return sorted(resos)


class BucketBatchIndex(NamedTuple):
    bucket_index: int
    bucket_batch_size: int
    batch_index: int


class BucketManager:
    """Buckets of image keys by resolution (width, height)."""

    def __init__(self, no_upscale: bool, max_reso: Optional[Tuple[int, int]], min_size: Optional[int],
                 max_size: Optional[int], reso_steps: Optional[int]) -> None:
        if max_size is not None:
            if max_reso is not None and (max_size < max_reso[0] or max_size < max_reso[1]):
                raise ValueError(f"max_bucket_reso {max_size} is smaller than the resolution {max_reso}")
            if min_size is not None and max_size < min_size:
                raise ValueError(f"max_bucket_reso {max_size} is smaller than min_bucket_reso {min_size}")
        self.no_upscale = no_upscale
        self.max_reso = max_reso
        self.max_area = None if max_reso is None else max_reso[0] * max_reso[1]
        self.min_size = min_size
        self.max_size = max_size
        self.reso_steps = reso_steps

        self.resos: List[Tuple[int, int]] = []
        self.reso_to_id = {}
        self.buckets: List[list] = []
        self.predefined_resos: List[Tuple[int, int]] = []
        self.predefined_resos_set = set()
        self.predefined_aspect_ratios = np.zeros((0,))

    # -- bucket list --------------------------------------------------------
    def make_buckets(self):
        self.set_predefined_resos(make_bucket_resolutions(self.max_reso, self.min_size, self.max_size,
                                                          self.reso_steps))

    def set_predefined_resos(self, resos: Sequence[Tuple[int, int]]):
        self.predefined_resos = list(resos)
        self.predefined_resos_set = set(self.predefined_resos)
        self.predefined_aspect_ratios = np.array([w / h for w, h in self.predefined_resos])

    def add_if_new_reso(self, reso: Tuple[int, int]):
        if reso not in self.reso_to_id:
            self.reso_to_id[reso] = len(self.resos)
            self.resos.append(reso)
            self.buckets.append([])

    def add_image(self, reso, image_key):
        self.buckets[self.reso_to_id[reso]].append(image_key)

    def shuffle(self):
        """Shuffle every bucket with the global ``random`` state (seeded by the dataset per epoch)."""
        for bucket in self.buckets:
            random.shuffle(bucket)

    def sort(self):
        """Order buckets by resolution (display and metadata only), renumbering them."""
        order = sorted(self.resos)
        self.buckets = [self.buckets[self.reso_to_id[r]] for r in order]
        self.resos = order
        self.reso_to_id = {r: i for i, r in enumerate(order)}

    def round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.reso_steps

    # -- selection ------------------------------------------------------------
    def select_bucket(self, image_width: int, image_height: int):
        """-> (bucket reso (w, h), resized size (w, h), aspect-ratio error)."""
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso not in self.predefined_resos_set:
                errors = np.abs(self.predefined_aspect_ratios - aspect_ratio)
                reso = self.predefined_resos[int(errors.argmin())]
            if aspect_ratio > reso[0] / reso[1]:
                scale = reso[1] / image_height  # wider than the bucket: match heights
            else:
                scale = reso[0] / image_width
            resized_size = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if image_width * image_height > self.max_area:
                resized_width = math.sqrt(self.max_area * aspect_ratio)
                resized_height = self.max_area / resized_width
                w_rounded = self.round_to_steps(resized_width)
                h_for_w = self.round_to_steps(w_rounded / aspect_ratio)
                ar_w = w_rounded / h_for_w
                h_rounded = self.round_to_steps(resized_height)
                w_for_h = self.round_to_steps(h_rounded * aspect_ratio)
                ar_h = w_for_h / h_rounded
                if abs(ar_w - aspect_ratio) < abs(ar_h - aspect_ratio):
                    resized_size = (w_rounded, int(w_rounded / aspect_ratio + 0.5))
                else:
                    resized_size = (int(h_rounded * aspect_ratio + 0.5), h_rounded)
            else:
                resized_size = (image_width, image_height)
            reso = (resized_size[0] - resized_size[0] % self.reso_steps,
                    resized_size[1] - resized_size[1] % self.reso_steps)

        if reso[0] <= 0 or reso[1] <= 0:
            raise ValueError(f"image {image_width}x{image_height} is smaller than one bucket step "
                             f"({self.reso_steps}): no bucket fits it")
        self.add_if_new_reso(reso)
        ar_error = reso[0] / reso[1] - aspect_ratio
        return reso, resized_size, ar_error

    @staticmethod
    def get_crop_ltrb(bucket_reso: Tuple[int, int], image_size: Tuple[int, int]):
        """Crop (left, top, right, bottom) of the image fitted inside the bucket,
        centred (Stability AI's preprocessing; right is used for flips)."""
        bucket_ar = bucket_reso[0] / bucket_reso[1]
        image_ar = image_size[0] / image_size[1]
        if bucket_ar > image_ar:
            resized_width = bucket_reso[1] * image_ar
            resized_height = bucket_reso[1]
        else:
            resized_width = bucket_reso[0]
            resized_height = bucket_reso[0] / image_ar
        crop_left = (bucket_reso[0] - resized_width) // 2
        crop_top = (bucket_reso[1] - resized_height) // 2
        return crop_left, crop_top, crop_left + resized_width, crop_top + resized_height
