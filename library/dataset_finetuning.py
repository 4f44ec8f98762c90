"""Fine-tuning datasets (kohya's ``FineTuningDataset``): captions (and tags)
from a metadata file.

* ``.json``: ``{"<image key>": {"caption": "...", "tags": "...", "image_size": [w, h]}, ...}``
* ``.jsonl``: one ``{"image_path": ..., "caption": ..., "tags": ..., "image_size": [w, h]}`` per line.

Relative image keys are resolved against ``image_dir``. kohya's metadata
(from its ``merge_captions_to_metadata.py``) stores keys *without* an
extension; we then look for ``<key><ext>`` with kohya's image extensions.
Tags are appended to the caption with ``caption_separator`` (to every
line with ``enable_wildcard``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from library import image_utils
from library.dataset_base import BaseDataset
from library.dataset_subsets import FineTuningSubset, ImageInfo
from library.device_utils import UserError

logger = logging.getLogger(__name__)


def load_metadata(metadata_file: str) -> dict:
    """Metadata as ``{image key: {"caption", "tags", "image_size"}}``; UserError naming the file on failure."""
    if not os.path.isfile(metadata_file):
        raise UserError(f"metadata file not found: {metadata_file}")
    try:
        with open(metadata_file, "rt", encoding="utf-8") as f:
            if metadata_file.endswith(".jsonl"):
                metadata = {}
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        md = json.loads(line)
                    except ValueError as e:
                        raise UserError(f"{metadata_file}:{lineno}: not valid JSON ({e})") from e
                    if not isinstance(md, dict) or "image_path" not in md:
                        raise UserError(f"{metadata_file}:{lineno}: entry has no \"image_path\"")
                    entry = {"caption": md.get("caption", "")}
                    for key in ("image_size", "tags"):
                        if key in md:
                            entry[key] = md[key]
                    metadata[md["image_path"]] = entry
            else:
                try:
                    metadata = json.load(f)
                except ValueError as e:
                    raise UserError(f"{metadata_file}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise UserError(f"metadata file is not UTF-8 text: {metadata_file}") from e
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in metadata.values()):
        raise UserError(f"{metadata_file}: expected an object {{image: {{\"caption\": ...}}}}")
    return metadata


def resolve_image_path(image_key: str, image_dir: Optional[str]) -> Optional[str]:
    """Absolute path of a metadata entry's image, or None when no file exists."""
    path = image_key if os.path.isabs(image_key) else os.path.join(image_dir, image_key)
    if os.path.isfile(path):
        return path
    for ext in image_utils.IMAGE_EXTENSIONS:
        if os.path.isfile(path + ext):
            return path + ext
    return None


class FineTuningDataset(BaseDataset):
    def __init__(self, subsets: Sequence[FineTuningSubset], batch_size: int = 1, resolution=None,
                 network_multiplier: float = 1.0, enable_bucket: bool = False, min_bucket_reso: int = 256,
                 max_bucket_reso: int = 1024, bucket_reso_steps: int = 64, bucket_no_upscale: bool = False,
                 debug_dataset: bool = False, validation_seed: Optional[int] = None, validation_split: float = 0.0,
                 resize_interpolation: Optional[str] = None, **_ignored) -> None:
        super().__init__(resolution, network_multiplier, debug_dataset, resize_interpolation)
        if resolution is None:
            raise UserError("resolution is required (dataset config 'resolution' or --resolution)")
        self.batch_size = batch_size
        self.size = min(self.width, self.height)
        self._setup_buckets(resolution, enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps,
                            bucket_no_upscale)
        self.num_train_images = 0
        self.num_reg_images = 0
        missing = []

        for subset in subsets:
            if not self._usable_subset(subset, subset.num_repeats, f"metadata_file='{subset.metadata_file}'"):
                continue
            metadata = load_metadata(subset.metadata_file)
            if len(metadata) < 1:
                logger.warning(f"ignore subset with '{subset.metadata_file}': no image entries found")
                continue

            tags_list = []
            for image_key, md in metadata.items():
                if not os.path.isabs(image_key) and subset.image_dir is None:
                    raise UserError(f"image_dir is required when image paths are relative: '{image_key}' in "
                                    f"{subset.metadata_file}")
                abs_path = resolve_image_path(image_key, subset.image_dir)
                if abs_path is None:
                    shown = image_key if os.path.isabs(image_key) else os.path.join(subset.image_dir, image_key)
                    missing.append(f"{shown}: image of metadata entry '{image_key}' in {subset.metadata_file} "
                                   f"not found")
                    continue
                caption = md.get("caption")
                tags = md.get("tags")
                if caption is None:
                    caption = ""
                if subset.enable_wildcard:
                    if tags is not None:
                        tags = tags.replace("\n", subset.caption_separator)
                        caption = "\n".join(f"{line}{subset.caption_separator}{tags}"
                                            for line in caption.split("\n") if line.strip() != "")
                        tags_list.append(tags)
                elif tags:
                    if caption:
                        caption = caption + subset.caption_separator
                    caption = caption + tags
                    tags_list.append(tags)

                info = ImageInfo(image_key, subset.num_repeats, caption, False, abs_path, subset.caption_dropout_rate)
                info.resize_interpolation = (subset.resize_interpolation if subset.resize_interpolation is not None
                                             else self.resize_interpolation)
                if md.get("image_size") is not None:
                    info.image_size = tuple(int(v) for v in md["image_size"])
                self.register_image(info, subset)

            self.num_train_images += len(metadata) * subset.num_repeats
            self.set_tag_frequency(os.path.basename(subset.metadata_file), tags_list)
            subset.img_count = len(metadata)
            self.subsets.append(subset)

        if missing:
            from library.dataset_check import raise_bad_data
            raise_bad_data(missing)
