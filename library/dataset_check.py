"""Pre-flight scan of the training data: every problem that would otherwise
stop a run halfway is found before the first step and reported with the
file's path.

Checked per image: the file exists and is not empty; the header is readable;
width x height is at most ``image_utils.MAX_IMAGE_PIXELS`` (decompression
bombs); the whole image decodes (corrupt or truncated files); a size given in
metadata matches the file; without bucketing (and when the image is not
turned into cached latents, which are resized as kohya does) the image must
match the resolution or be croppable to it (``random_crop`` or a face crop).
A ``conditioning_data_dir`` mask image is checked as an image, and with
bucketing it must be the size of its image (kohya's assertion, which kohya
makes at the image's first batch). Captions (non-UTF-8, empty), metadata
entries whose image is missing and images without mask (or masks without
image) are reported when the dataset is built.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Iterable, List

from PIL import Image

from library import image_utils
from library.device_utils import UserError

logger = logging.getLogger(__name__)

MAX_LISTED = 5


class BadDataError(UserError):
    """Bad training data found before training; ``problems`` lists one line per file."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        shown = "; ".join(self.problems[:MAX_LISTED])
        more = f" (and {len(self.problems) - MAX_LISTED} more, see the log)" if len(self.problems) > MAX_LISTED else ""
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"bad training data, {len(self.problems)} {noun}: {shown}{more}")


def raise_bad_data(problems: Iterable[str]):
    problems = list(problems)
    for p in problems:
        logger.error(p)
    raise BadDataError(problems)


def check_image_file(path: str, expected_size=None) -> str:
    """'' if the image is usable, else a one-line problem naming the path."""
    if not os.path.isfile(path):
        return f"{path}: image file not found"
    if os.path.getsize(path) == 0:
        return f"{path}: zero-byte image file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > image_utils.MAX_IMAGE_PIXELS:
                    return (f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of "
                            f"{image_utils.MAX_IMAGE_PIXELS} (possible decompression bomb)")
                if expected_size is not None and tuple(expected_size) != (w, h):
                    return (f"{path}: metadata says {expected_size[0]}x{expected_size[1]} but the image is "
                            f"{w}x{h}")
                im.load()  # full decode: finds truncated and corrupt data
    except Image.DecompressionBombError as e:
        return f"{path}: exceeds the pixel limit (possible decompression bomb): {e}"
    except (OSError, ValueError, SyntaxError) as e:
        return f"{path}: corrupt or truncated image ({e})"
    return ""


def scan_dataset(dataset, latents_cached: bool = False) -> List[str]:
    problems = []
    for info in dataset.image_data.values():
        subset = dataset.image_to_subset[info.image_key]
        problem = check_image_file(info.absolute_path, info.image_size)
        if problem:
            problems.append(problem)
            continue
        cond_path = getattr(info, "cond_img_path", None)
        if cond_path is not None:
            problem = check_image_file(cond_path)
            if problem:
                problems.append(problem)
            elif dataset.enable_bucket:
                w, h = image_utils.get_image_size(cond_path)
                if (w, h) != tuple(info.image_size):
                    problems.append(f"{cond_path}: mask image {w}x{h} is not the size of its image "
                                    f"{info.absolute_path} ({info.image_size[0]}x{info.image_size[1]})")
        if dataset.enable_bucket or latents_cached:
            continue
        w, h = info.image_size
        face = dataset._face_info(subset, info.absolute_path)
        if face[0] > 0:
            continue
        if w < dataset.width or h < dataset.height:
            problems.append(f"{info.absolute_path}: image {w}x{h} is smaller than the resolution "
                            f"{dataset.width}x{dataset.height} and bucketing is disabled (enable_bucket)")
        elif (w > dataset.width or h > dataset.height) and not subset.random_crop:
            problems.append(f"{info.absolute_path}: image {w}x{h} is larger than the resolution "
                            f"{dataset.width}x{dataset.height}, and neither bucketing nor random_crop is enabled")
    return problems


def scan_dataset_group(dataset_group, latents_cached: bool = False):
    """Raise BadDataError listing every bad image of every dataset (after ``make_buckets``)."""
    problems = []
    for dataset in dataset_group.datasets:
        problems.extend(scan_dataset(dataset, latents_cached))
    if problems:
        raise_bad_data(problems)
    logger.info(f"pre-flight check passed: {sum(len(d.image_data) for d in dataset_group.datasets)} images")


def check_weighted_captions(dataset_group):
    """``--weighted_captions``: every caption parses as kohya's attention syntax (a bad weight such as
    ``(x:1.2.3)`` would otherwise stop the run at the batch that draws it); BadDataError naming each image."""
    from library.prompt_weighting import parse_prompt_attention

    problems = []
    for dataset in dataset_group.datasets:
        for info in dataset.image_data.values():
            try:
                parse_prompt_attention(info.caption or "")
            except ValueError as e:
                problems.append(f"{info.absolute_path}: caption: {e}")
    if problems:
        raise_bad_data(problems)
