"""DreamBooth datasets (kohya's ``DreamBoothDataset``): image folders whose
captions are ``class_tokens`` or caption files (``caption_extension``,
default ``.caption``), with regularization subsets (``is_reg``).

Regularization balancing (kohya): with ``T`` training images counted with
repeats, reg images are registered in order with their own ``num_repeats``
until ``T`` is reached; if the first pass does not reach ``T``, further passes
add one repeat to each reg image in turn until it does. So the reg images
contribute ``max(T, R)`` samples per epoch if ``R`` (reg with repeats) is at
most ``T`` after one pass, otherwise only as many as the first pass
registered (some reg images unused).

Subsets with ``conditioning_data_dir`` (kohya's ControlNetDataset, used by
--masked_loss) pair every image with the mask image of the same file stem in
that folder (kohya's ``glob_images(dir, stem)``, the first in sorted order).
As kohya, an image without a mask and a mask without an image are errors; all
of them are named in one error when the dataset is built.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from typing import List, Optional, Sequence, Tuple

from library import caption_utils, image_utils
from library.dataset_base import BaseDataset
from library.dataset_subsets import DreamBoothSubset, ImageInfo
from library.device_utils import UserError

logger = logging.getLogger(__name__)


def split_train_val(paths: List[str], sizes: List[Optional[Tuple[int, int]]], is_training_dataset: bool,
                    validation_split: float, validation_seed: Optional[int]):
    """kohya's split: shuffle (seeded with validation_seed, keeping the global state),
    training = first ceil(n * (1 - split)), validation = last round(n * split)."""
    pairs = list(zip(paths, sizes))
    if validation_seed is not None:
        state = random.getstate()
        random.seed(validation_seed)
        random.shuffle(pairs)
        random.setstate(state)
    else:
        random.shuffle(pairs)
    paths = [p for p, _ in pairs]
    sizes = [s for _, s in pairs]
    if is_training_dataset:
        n = math.ceil(len(paths) * (1 - validation_split))
        return paths[:n], sizes[:n]
    n = len(paths) - round(len(paths) * validation_split)
    return paths[n:], sizes[n:]


class DreamBoothDataset(BaseDataset):
    IMAGE_INFO_CACHE_FILE = "metadata_cache.json"

    def __init__(self, subsets: Sequence[DreamBoothSubset], is_training_dataset: bool = True, batch_size: int = 1,
                 resolution=None, network_multiplier: float = 1.0, enable_bucket: bool = False,
                 min_bucket_reso: int = 256, max_bucket_reso: int = 1024, bucket_reso_steps: int = 64,
                 bucket_no_upscale: bool = False, prior_loss_weight: float = 1.0, debug_dataset: bool = False,
                 validation_split: float = 0.0, validation_seed: Optional[int] = None,
                 resize_interpolation: Optional[str] = None) -> None:
        super().__init__(resolution, network_multiplier, debug_dataset, resize_interpolation)
        if resolution is None:
            raise UserError("resolution is required (dataset config 'resolution' or --resolution)")
        self.batch_size = batch_size
        self.size = min(self.width, self.height)
        self.prior_loss_weight = prior_loss_weight
        self.is_training_dataset = is_training_dataset
        self.validation_split = validation_split
        self.validation_seed = validation_seed
        self._setup_buckets(resolution, enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps,
                            bucket_no_upscale)

        num_train_images = 0
        num_reg_images = 0
        self._cond_img_paths = {}  # image path -> mask image path (conditioning_data_dir subsets)
        mask_problems: List[str] = []
        reg_infos: List[Tuple[ImageInfo, DreamBoothSubset]] = []
        for subset in subsets:
            num_repeats = subset.num_repeats if self.is_training_dataset else 1
            if not self._usable_subset(subset, num_repeats, f"image_dir='{subset.image_dir}'"):
                continue
            img_paths, captions, sizes = self._load_dir(subset, mask_problems)
            if len(img_paths) < 1:
                logger.warning(f"ignore subset with image_dir='{subset.image_dir}': no images found")
                continue
            if subset.is_reg:
                num_reg_images += num_repeats * len(img_paths)
            else:
                num_train_images += num_repeats * len(img_paths)
            for img_path, caption, size in zip(img_paths, captions, sizes):
                info = ImageInfo(img_path, num_repeats, caption, subset.is_reg, img_path, subset.caption_dropout_rate)
                info.resize_interpolation = (subset.resize_interpolation if subset.resize_interpolation is not None
                                             else self.resize_interpolation)
                if size is not None:
                    info.image_size = tuple(size)
                info.cond_img_path = self._cond_img_paths.get(img_path)
                if subset.is_reg:
                    reg_infos.append((info, subset))
                else:
                    self.register_image(info, subset)
            subset.img_count = len(img_paths)
            self.subsets.append(subset)

        mask_problems += self._extra_masks()
        if mask_problems:
            from library.dataset_check import raise_bad_data
            raise_bad_data(mask_problems)

        split_name = "train" if self.is_training_dataset else "validation"
        logger.info(f"{num_train_images} {split_name} images with repeats.")
        self.num_train_images = num_train_images
        logger.info(f"{num_reg_images} reg images with repeats.")
        if num_train_images < num_reg_images:
            logger.warning("some of reg images are not used")
        if num_reg_images == 0:
            logger.warning("no regularization images")
        else:
            self._register_reg_images(reg_infos, num_train_images)
        self.num_reg_images = num_reg_images

    def _register_reg_images(self, reg_infos, num_train_images):
        n = 0
        first_loop = True
        while n < num_train_images:
            for info, subset in reg_infos:
                if first_loop:
                    self.register_image(info, subset)
                    n += info.num_repeats
                else:
                    info.num_repeats += 1
                    n += 1
                if n >= num_train_images:
                    break
            first_loop = False

    def _pair_masks(self, subset: DreamBoothSubset, img_paths: List[str], problems: List[str]):
        """kohya's ControlNetDataset check, over all images of the folder (before the validation split, so
        a validation dataset does not see the training images' masks as extra)."""
        cond_dir = subset.conditioning_data_dir
        if not os.path.isdir(cond_dir):
            # kohya only warns here, then fails at the first batch
            problems.append(f"conditioning_data_dir is not a directory: {cond_dir} (subset {subset.image_dir})")
            return
        for img_path in img_paths:
            stem = os.path.splitext(os.path.basename(img_path))[0]
            found = image_utils.glob_images(cond_dir, stem)
            if not found:
                problems.append(f"{img_path}: no mask image {stem}.* in conditioning_data_dir {cond_dir}")
                continue
            self._cond_img_paths[img_path] = os.path.abspath(found[0])

    def _extra_masks(self) -> List[str]:
        """Mask images that no image of the dataset's subsets pairs with (kohya: an error). Compared by path
        without extension, as kohya (a.png and a.jpg of one stem both count as paired)."""
        paired = {os.path.splitext(p)[0] for p in self._cond_img_paths.values()}
        problems = []
        cond_dirs = dict.fromkeys(s.conditioning_data_dir for s in self.subsets if s.conditioning_data_dir)
        for cond_dir in cond_dirs:
            if not os.path.isdir(cond_dir):
                continue
            for path in image_utils.glob_images(cond_dir, "*"):
                if os.path.splitext(os.path.abspath(path))[0] not in paired:
                    problems.append(f"{path}: mask image without a training image of that name "
                                    f"(kohya refuses extra conditioning images)")
        return problems

    def _load_dir(self, subset: DreamBoothSubset, mask_problems: Optional[List[str]] = None):
        if not os.path.isdir(subset.image_dir):
            raise UserError(f"image_dir is not a directory: {subset.image_dir}")

        info_cache_file = os.path.join(subset.image_dir, self.IMAGE_INFO_CACHE_FILE)
        use_cache = subset.cache_info and os.path.isfile(info_cache_file)
        if subset.cache_info and not use_cache:
            logger.warning(f"image info cache not found (normal on the first run): {info_cache_file}")
        if use_cache:
            try:
                with open(info_cache_file, "r", encoding="utf-8") as f:
                    metas = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read image info cache {info_cache_file}: {e}") from e
            img_paths = list(metas.keys())
            sizes = [meta["resolution"] for meta in metas.values()]
        else:
            img_paths = image_utils.glob_images(subset.image_dir, "*")
            sizes = [None] * len(img_paths)
        if subset.conditioning_data_dir is not None:
            self._pair_masks(subset, img_paths, mask_problems if mask_problems is not None else [])

        if self.validation_split > 0.0:
            if subset.is_reg:
                if not self.is_training_dataset:
                    img_paths, sizes = [], []
            else:
                img_paths, sizes = split_train_val(img_paths, sizes, self.is_training_dataset,
                                                   self.validation_split, self.validation_seed)

        logger.info(f"found directory {subset.image_dir} contains {len(img_paths)} image files")

        captions, missing = [], []
        if use_cache:
            captions = [metas[p]["caption"] for p in img_paths]
            missing = [p for p, c in zip(img_paths, captions) if not c]
        else:
            for img_path in img_paths:
                cap = caption_utils.read_caption(img_path, subset.caption_extension, subset.enable_wildcard)
                if cap is None:
                    missing.append(img_path)
                    if subset.class_tokens is None:
                        logger.warning(f"neither caption file nor class tokens are found. use empty caption for "
                                       f"{img_path}")
                        captions.append("")
                    else:
                        captions.append(subset.class_tokens)
                else:
                    captions.append(cap)
        self.set_tag_frequency(os.path.basename(subset.image_dir), captions)
        if missing:
            logger.warning(f"No caption file found for {len(missing)} images. Training will continue without "
                           f"captions for these images. If class token exists, it will be used.")
            for i, p in enumerate(missing[:5]):
                logger.warning(p + (f"... and {len(missing) - 5} more" if i == 4 and len(missing) > 5 else ""))

        if subset.cache_info and not use_cache:
            sizes = [image_utils.get_image_size(p) for p in img_paths]
            metas = {p: {"caption": c, "resolution": list(s)} for p, c, s in zip(img_paths, captions, sizes)}
            tmp = info_cache_file + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(metas, f, ensure_ascii=False, indent=2)
            os.replace(tmp, info_cache_file)
            logger.info(f"cached image info to {info_cache_file}")
        return img_paths, captions, sizes
