"""``BaseDataset``: buckets, epochs, and the batch for one index (kohya's
``BaseDataset`` in library/train_util.py), with numpy arrays instead of torch
tensors.

One dataset index is one *batch*: images of one bucket, so every array in it
has a fixed shape for that bucket. ``dataset[i]`` returns a dict:

===================== ==========================================================
``loss_weights``      float32 (B,): ``prior_loss_weight`` for reg images, else 1
``images``            float32 (B, 3, H, W) in [-1, 1], or None when latents are cached
``latents``           float32 (B, 4, H/8, W/8) *unscaled* VAE samples, or None
``captions``          list of B processed captions
``input_ids_list``    [ids1, ids2], int64 (B, n_chunks, 77) each; None when
                      tokenizers are not set or text-encoder outputs are cached
``text_encoder_outputs_list`` [hidden1 (B, T, 768), hidden2 (B, T, 1280),
                      pool2 (B, 1280)] float32 when cached, else None
``original_sizes_hw`` int64 (B, 2); ``crop_top_lefts`` int64 (B, 2);
``target_sizes_hw``   int64 (B, 2): SDXL's size conditioning (kohya's formula)
``flippeds``          list of B bools
``alpha_masks``       float32 (B, H, W) in [0, 1] with ``alpha_mask`` subsets (alpha / 255) or
                      ``conditioning_data_dir`` subsets (the mask image's red channel / 255,
                      kohya's conditioning image mapped back from [-1, 1]), else None
``network_multipliers`` float32 (B,)
``custom_attributes`` list of B dicts; ``image_keys`` list of B keys
===================== ==========================================================

The trainer multiplies ``latents`` by the VAE scale factor (0.13025), as kohya.
"""
from __future__ import annotations

import logging
import math
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from library import caption_utils, image_utils
from library.bucket_manager import BucketBatchIndex, BucketManager
from library.dataset_subsets import BaseSubset, DreamBoothSubset, FineTuningSubset, ImageInfo
from library.device_utils import UserError

logger = logging.getLogger(__name__)


class BaseDataset:
    def __init__(self, resolution: Optional[Tuple[int, int]], network_multiplier: float, debug_dataset: bool,
                 resize_interpolation: Optional[str] = None) -> None:
        self.width, self.height = (None, None) if resolution is None else resolution
        self.network_multiplier = network_multiplier
        self.debug_dataset = debug_dataset
        self.subsets: List[Union[DreamBoothSubset, FineTuningSubset]] = []
        self.tag_frequency: Dict[str, Dict[str, int]] = {}

        self.enable_bucket = False
        self.bucket_manager: Optional[BucketManager] = None
        self.min_bucket_reso = None
        self.max_bucket_reso = None
        self.bucket_reso_steps = None
        self.bucket_no_upscale = None
        self.bucket_info = None
        self.buckets_indices: List[BucketBatchIndex] = []
        self._length = 0

        self.current_epoch = 0
        self.current_step = 0
        self.max_train_steps = 0
        self.seed = 0
        self.prior_loss_weight = 1.0
        self.batch_size = 1
        self.num_train_images = 0
        self.num_reg_images = 0

        if resize_interpolation is not None and not image_utils.validate_interpolation_fn(resize_interpolation):
            raise UserError(f'resize_interpolation "{resize_interpolation}" is not one of '
                            f'{", ".join(image_utils.INTERPOLATIONS)}')
        self.resize_interpolation = resize_interpolation

        self.image_data: Dict[str, ImageInfo] = {}
        self.image_to_subset: Dict[str, BaseSubset] = {}
        self.replacements: Dict[str, object] = {}

        self.tokenizers = None
        self.max_token_length = None

    # -- configuration ---------------------------------------------------------
    def _setup_buckets(self, resolution, enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps,
                       bucket_no_upscale):
        self.enable_bucket = enable_bucket
        if enable_bucket:
            if bucket_reso_steps is None or bucket_reso_steps <= 0:
                raise UserError(f"bucket_reso_steps must be a positive integer, got {bucket_reso_steps}")
            self.min_bucket_reso, self.max_bucket_reso = self.adjust_min_max_bucket_reso_by_steps(
                resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
            self.bucket_reso_steps = bucket_reso_steps
            self.bucket_no_upscale = bucket_no_upscale
        else:
            self.min_bucket_reso = self.max_bucket_reso = self.bucket_reso_steps = None
            self.bucket_no_upscale = False

    @staticmethod
    def adjust_min_max_bucket_reso_by_steps(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps):
        """Round min down and max up to multiples of the step, as kohya (with a warning)."""
        if min_bucket_reso % bucket_reso_steps != 0:
            adjusted = min_bucket_reso - min_bucket_reso % bucket_reso_steps
            logger.warning(f"min_bucket_reso is adjusted to be multiple of bucket_reso_steps: "
                           f"{min_bucket_reso} -> {adjusted}")
            min_bucket_reso = adjusted
        if max_bucket_reso % bucket_reso_steps != 0:
            adjusted = max_bucket_reso + bucket_reso_steps - max_bucket_reso % bucket_reso_steps
            logger.warning(f"max_bucket_reso is adjusted to be multiple of bucket_reso_steps: "
                           f"{max_bucket_reso} -> {adjusted}")
            max_bucket_reso = adjusted
        if min(resolution) < min_bucket_reso:
            raise UserError(f"min_bucket_reso {min_bucket_reso} must be <= the smaller side of resolution "
                            f"{tuple(resolution)}")
        if max(resolution) > max_bucket_reso:
            raise UserError(f"max_bucket_reso {max_bucket_reso} must be >= the larger side of resolution "
                            f"{tuple(resolution)}")
        return min_bucket_reso, max_bucket_reso

    def set_tokenizers(self, tokenizers, max_token_length=None):
        """SDXL's two CLIP tokenizers (``library.clip_tokenizer.load_tokenizers()``)."""
        self.tokenizers = tokenizers
        self.max_token_length = max_token_length

    def set_seed(self, seed):
        self.seed = seed

    def set_current_epoch(self, epoch):
        """Reshuffle the buckets once per epoch step (seed + epoch), as kohya."""
        if self.current_epoch == epoch:
            return
        if epoch > self.current_epoch:
            for _ in range(epoch - self.current_epoch):
                self.current_epoch += 1
                self.shuffle_buckets()
        else:
            logger.warning(f"epoch is not incremented. current_epoch: {self.current_epoch}, epoch: {epoch}")
            self.current_epoch = epoch

    def set_current_step(self, step):
        self.current_step = step

    def set_max_train_steps(self, max_train_steps):
        self.max_train_steps = max_train_steps

    def add_replacement(self, str_from, str_to):
        self.replacements[str_from] = str_to

    def set_tag_frequency(self, dir_name, captions):
        self.tag_frequency[dir_name] = caption_utils.count_tags(self.tag_frequency.get(dir_name, {}), captions)

    def process_caption(self, subset: BaseSubset, caption: str) -> str:
        return caption_utils.process_caption(subset, caption, self.current_epoch, self.current_step,
                                             self.max_train_steps, self.replacements)

    def _usable_subset(self, subset: BaseSubset, num_repeats: int, source: str) -> bool:
        """kohya skips, with a warning, a subset without repeats or one given twice (the first one is used)."""
        if num_repeats < 1:
            logger.warning(f"ignore subset with {source}: num_repeats is less than 1: {num_repeats}")
            return False
        if subset in self.subsets:
            logger.warning(f"ignore duplicated subset with {source}: use the first one")
            return False
        return True

    def register_image(self, info: ImageInfo, subset: BaseSubset):
        self.image_data[info.image_key] = info
        self.image_to_subset[info.image_key] = subset

    def verify_bucket_reso_steps(self, min_steps: int):
        if self.bucket_reso_steps is not None and self.bucket_reso_steps % min_steps != 0:
            raise UserError(f"bucket_reso_steps is {self.bucket_reso_steps}: it must be divisible by {min_steps}")

    def is_latent_cacheable(self) -> bool:
        return all(not s.color_aug and not s.random_crop for s in self.subsets)

    def is_text_encoder_output_cacheable(self) -> bool:
        return all(not (s.caption_dropout_rate > 0 or s.shuffle_caption or s.token_warmup_step > 0
                        or s.caption_tag_dropout_rate > 0) for s in self.subsets)

    # -- buckets ---------------------------------------------------------------
    def read_image_sizes(self):
        """Image sizes from file headers; all unreadable files are named in one UserError."""
        bad = []
        for info in self.image_data.values():
            if info.image_size is not None:
                continue
            if not os.path.isfile(info.absolute_path):
                bad.append(f"{info.absolute_path}: image file not found")
            elif os.path.getsize(info.absolute_path) == 0:
                bad.append(f"{info.absolute_path}: zero-byte image file")
            else:
                try:
                    info.image_size = image_utils.get_image_size(info.absolute_path)
                except UserError as e:
                    bad.append(str(e))
        if bad:
            from library.dataset_check import raise_bad_data
            raise_bad_data(bad)

    def make_buckets(self):
        """Assign every image to a bucket and build the batch index (needed without bucketing too)."""
        self.read_image_sizes()
        if self.enable_bucket:
            if self.bucket_manager is None:
                self.bucket_manager = BucketManager(self.bucket_no_upscale, (self.width, self.height),
                                                    self.min_bucket_reso, self.max_bucket_reso,
                                                    self.bucket_reso_steps)
                if not self.bucket_no_upscale:
                    self.bucket_manager.make_buckets()
                else:
                    logger.warning("min_bucket_reso and max_bucket_reso are ignored if bucket_no_upscale is set, "
                                   "because bucket reso is defined by image size automatically")
            ar_errors = []
            for info in self.image_data.values():
                try:
                    info.bucket_reso, info.resized_size, err = self.bucket_manager.select_bucket(*info.image_size)
                except ValueError as e:
                    raise UserError(f"{info.absolute_path}: {e}") from None
                ar_errors.append(abs(err))
            self.bucket_manager.sort()
        else:
            self.bucket_manager = BucketManager(False, (self.width, self.height), None, None, None)
            self.bucket_manager.set_predefined_resos([(self.width, self.height)])
            for info in self.image_data.values():
                info.bucket_reso, info.resized_size, _ = self.bucket_manager.select_bucket(*info.image_size)

        for info in self.image_data.values():
            for _ in range(info.num_repeats):
                self.bucket_manager.add_image(info.bucket_reso, info.image_key)

        if self.enable_bucket:
            self.bucket_info = {"buckets": {}}
            logger.info("number of images (including repeats) per bucket")
            for i, (reso, bucket) in enumerate(zip(self.bucket_manager.resos, self.bucket_manager.buckets)):
                if bucket:
                    self.bucket_info["buckets"][i] = {"resolution": reso, "count": len(bucket)}
                    logger.info(f"bucket {i}: resolution {reso}, count: {len(bucket)}")
            mean_err = float(np.mean(ar_errors)) if ar_errors else 0.0
            self.bucket_info["mean_img_ar_error"] = mean_err
            logger.info(f"mean ar error (without repeats): {mean_err}")

        self.buckets_indices = []
        for bucket_index, bucket in enumerate(self.bucket_manager.buckets):
            for batch_index in range(int(math.ceil(len(bucket) / self.batch_size))):
                self.buckets_indices.append(BucketBatchIndex(bucket_index, self.batch_size, batch_index))
        self.shuffle_buckets()
        self._length = len(self.buckets_indices)

    def shuffle_buckets(self):
        """Seeded with ``seed + current_epoch`` on Python's global random, as kohya."""
        random.seed(self.seed + self.current_epoch)
        random.shuffle(self.buckets_indices)
        self.bucket_manager.shuffle()

    def __len__(self):
        return self._length

    def batch_image_keys(self, index) -> List[str]:
        bi = self.buckets_indices[index]
        bucket = self.bucket_manager.buckets[bi.bucket_index]
        start = bi.batch_index * bi.bucket_batch_size
        return bucket[start:start + bi.bucket_batch_size]

    # -- one batch -------------------------------------------------------------
    def _crop_face(self, subset, image, face_cx, face_cy, face_w, face_h):
        """kohya's face-centred crop (``face_crop_aug_range``; file names ``..._cx_cy_w_h``)."""
        height, width = image.shape[:2]
        if height == self.height and width == self.width:
            return image
        face_size = max(face_w, face_h)
        size = min(self.height, self.width)
        min_scale = max(self.height / height, self.width / width)
        min_scale = min(1.0, max(min_scale, size / (face_size * subset.face_crop_aug_range[1])))
        max_scale = min(1.0, max(min_scale, size / (face_size * subset.face_crop_aug_range[0])))
        scale = min_scale if min_scale >= max_scale else random.uniform(min_scale, max_scale)
        nh, nw = int(height * scale + 0.5), int(width * scale + 0.5)
        image = image_utils.resize_image(image, width, height, nw, nh, subset.resize_interpolation)
        face_cx, face_cy = int(face_cx * scale + 0.5), int(face_cy * scale + 0.5)
        height, width = nh, nw
        for axis, (target, length, face_p) in enumerate(zip((self.height, self.width), (height, width),
                                                             (face_cy, face_cx))):
            p1 = face_p - target // 2
            if subset.random_crop:
                span = max(length - face_p, face_p)
                p1 = p1 + (random.randint(0, span) + random.randint(0, span)) - span
            elif subset.face_crop_aug_range[0] != subset.face_crop_aug_range[1]:
                if face_size > size // 10 and face_size >= 40:
                    p1 = p1 + random.randint(-face_size // 20, +face_size // 20)
            p1 = max(0, min(p1, length - target))
            image = image[p1:p1 + target] if axis == 0 else image[:, p1:p1 + target]
        return image

    @staticmethod
    def _face_info(subset, path):
        if subset.face_crop_aug_range is None:
            return 0, 0, 0, 0
        fields = os.path.splitext(os.path.basename(path))[0].split("_")
        if len(fields) >= 5:
            try:
                return tuple(int(t) for t in fields[-4:])
            except ValueError:
                return 0, 0, 0, 0
        return 0, 0, 0, 0

    def _load_cond_mask(self, info: ImageInfo, size_hw) -> np.ndarray:
        """The red channel (H, W) uint8 of a conditioning_data_dir mask image, at the image's size ``size_hw``.
        kohya needs equal sizes with bucketing (checked at start, dataset_check) and resizes the mask
        otherwise, with the dataset's resize_interpolation."""
        mask = image_utils.load_image(info.cond_img_path)[:, :, 0]
        if mask.shape != tuple(size_hw):
            if self.enable_bucket:
                raise UserError(f"{info.cond_img_path}: mask image {mask.shape[1]}x{mask.shape[0]} is not the size "
                                f"of its image {info.absolute_path} ({size_hw[1]}x{size_hw[0]})")
            mask = image_utils.resize_image(mask, mask.shape[1], mask.shape[0], size_hw[1], size_hw[0],
                                            self.resize_interpolation)
        return mask

    def _cond_mask_for_cached_latents(self, info: ImageInfo) -> np.ndarray:
        """The mask of an image whose latents are cached: resized and centre-cropped to the bucket as the
        image was when cached (no random crop with cached latents). It is read every step, as kohya reads
        conditioning images, so it is never stale in a latents cache."""
        w, h = info.image_size
        mask = self._load_cond_mask(info, (h, w))
        mask, _, _ = image_utils.trim_and_resize_if_required(False, mask, info.bucket_reso, info.resized_size,
                                                             info.resize_interpolation)
        return mask.astype(np.float32) / 255.0

    def _load_pixels(self, info: ImageInfo, subset: BaseSubset):
        """-> (HWC uint8 image at the bucket size, original size (w, h), crop ltrb). A conditioning_data_dir
        mask rides as a 4th channel, so it gets the image's resize, crops and flip (as an alpha channel)."""
        img = image_utils.load_image(info.absolute_path, subset.alpha_mask)
        if info.cond_img_path is not None:
            img = np.dstack([img[:, :, :3], self._load_cond_mask(info, img.shape[:2])])
        im_h, im_w = img.shape[:2]
        if self.enable_bucket:
            return image_utils.trim_and_resize_if_required(subset.random_crop, img, info.bucket_reso,
                                                           info.resized_size, info.resize_interpolation)
        face = self._face_info(subset, info.absolute_path)
        if face[0] > 0:
            img = self._crop_face(subset, img, *face)
        elif im_h > self.height or im_w > self.width:
            if not subset.random_crop:
                raise UserError(f"image {info.absolute_path} ({im_w}x{im_h}) is larger than the resolution "
                                f"{self.width}x{self.height}: enable bucketing (enable_bucket), random_crop "
                                f"or face_crop_aug_range")
            if im_h > self.height:
                p = random.randint(0, im_h - self.height)
                img = img[p:p + self.height]
            if im_w > self.width:
                p = random.randint(0, im_w - self.width)
                img = img[:, p:p + self.width]
        im_h, im_w = img.shape[:2]
        if im_h != self.height or im_w != self.width:
            raise UserError(f"image {info.absolute_path} ({im_w}x{im_h}) is smaller than the resolution "
                            f"{self.width}x{self.height} and bucketing is disabled: enable enable_bucket or "
                            f"resize the image")
        # kohya reports crop (0, 0, 0, 0) here, which turns into a crop left of W when flipped;
        # (0, 0, W, H) gives the same unflipped value and the correct flipped one (0).
        return img, (im_w, im_h), (0, 0, im_w, im_h)

    def __getitem__(self, index):
        keys = self.batch_image_keys(index)
        loss_weights, captions, images, latents_list, alpha_masks = [], [], [], [], []
        original_sizes_hw, crop_top_lefts, target_sizes_hw, flippeds = [], [], [], []
        te_outputs, custom_attributes, ids_captions = [], [], []

        for key in keys:
            info = self.image_data[key]
            subset = self.image_to_subset[key]
            custom_attributes.append(subset.custom_attributes)
            loss_weights.append(self.prior_loss_weight if info.is_reg else 1.0)
            flipped = subset.flip_aug and random.random() < 0.5

            image = None
            latents = None
            alpha_mask = None
            if info.latents is not None:
                original_size, crop_ltrb = info.latents_original_size, info.latents_crop_ltrb
                latents = info.latents_flipped if flipped else info.latents
                alpha_mask = info.alpha_mask
                if info.cond_img_path is not None:
                    alpha_mask = self._cond_mask_for_cached_latents(info)
                if alpha_mask is not None and flipped:
                    alpha_mask = alpha_mask[:, ::-1].copy()
            elif info.latents_npz is not None:
                from library.latent_cache import load_latents_from_disk
                latents, original_size, crop_ltrb, latents_flipped, alpha_mask = load_latents_from_disk(
                    info.latents_npz)
                if info.cond_img_path is not None:
                    alpha_mask = self._cond_mask_for_cached_latents(info)
                if flipped:
                    latents = latents_flipped
                    alpha_mask = None if alpha_mask is None else alpha_mask[:, ::-1].copy()
            else:
                img, original_size, crop_ltrb = self._load_pixels(info, subset)
                if subset.color_aug:
                    img = img.copy()
                    img[:, :, :3] = image_utils.color_aug(np.ascontiguousarray(img[:, :, :3]))
                if flipped:
                    img = img[:, ::-1, :].copy()
                if subset.alpha_mask or info.cond_img_path is not None:
                    if img.shape[2] == 4:
                        alpha_mask = img[:, :, 3].astype(np.float32) / 255.0
                    else:
                        alpha_mask = np.ones(img.shape[:2], np.float32)
                image = image_utils.to_chw_float(img[:, :, :3])

            images.append(image)
            latents_list.append(latents)
            alpha_masks.append(alpha_mask)
            if image is not None:
                target_size = (image.shape[2], image.shape[1])
            else:
                target_size = (latents.shape[2] * 8, latents.shape[1] * 8)
            if flipped:
                crop_left_top = (target_size[0] - crop_ltrb[2], crop_ltrb[1])
            else:
                crop_left_top = (crop_ltrb[0], crop_ltrb[1])
            original_sizes_hw.append((int(original_size[1]), int(original_size[0])))
            crop_top_lefts.append((int(crop_left_top[1]), int(crop_left_top[0])))
            target_sizes_hw.append((int(target_size[1]), int(target_size[0])))
            flippeds.append(bool(flipped))

            caption = info.caption
            outputs = info.text_encoder_outputs
            if outputs is None and info.text_encoder_outputs_npz is not None:
                from library.latent_cache import load_text_encoder_outputs_from_disk
                outputs = load_text_encoder_outputs_from_disk(info.text_encoder_outputs_npz)
            te_outputs.append(outputs)
            if outputs is None:
                caption = self.process_caption(subset, info.caption)
                ids_captions.append(caption)
            captions.append(caption)

        example = {
            "loss_weights": np.asarray(loss_weights, np.float32),
            "captions": captions,
            "image_keys": list(keys),
            "custom_attributes": custom_attributes,
            "flippeds": flippeds,
            "original_sizes_hw": np.asarray(original_sizes_hw, np.int64),
            "crop_top_lefts": np.asarray(crop_top_lefts, np.int64),
            "target_sizes_hw": np.asarray(target_sizes_hw, np.int64),
            "network_multipliers": np.full((len(keys),), self.network_multiplier, np.float32),
            "images": np.stack(images).astype(np.float32) if images[0] is not None else None,
            "latents": np.stack(latents_list).astype(np.float32) if latents_list[0] is not None else None,
        }
        if all(m is None for m in alpha_masks):
            example["alpha_masks"] = None
        else:
            h, w = target_sizes_hw[0]
            example["alpha_masks"] = np.stack([np.ones((h, w), np.float32) if m is None else m
                                               for m in alpha_masks]).astype(np.float32)
        if te_outputs[0] is not None:
            example["text_encoder_outputs_list"] = [np.stack([o[i] for o in te_outputs]).astype(np.float32)
                                                    for i in range(len(te_outputs[0]))]
            example["input_ids_list"] = None
        else:
            example["text_encoder_outputs_list"] = None
            if self.tokenizers is not None:
                from library.token_chunking import tokenize_sdxl
                example["input_ids_list"] = list(tokenize_sdxl(ids_captions, self.tokenizers,
                                                               self.max_token_length))
            else:
                example["input_ids_list"] = None
        return example
