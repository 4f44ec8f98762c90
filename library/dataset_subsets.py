"""Subsets (one image folder or metadata file each) and per-image records,
as kohya's ``BaseSubset``/``DreamBoothSubset``/``FineTuningSubset`` and
``ImageInfo``. Subsets take the same keyword names as the dataset config."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np


class ImageInfo:
    def __init__(self, image_key: str, num_repeats: int, caption: str, is_reg: bool, absolute_path: str,
                 caption_dropout_rate: float = 0.0) -> None:
        self.image_key = image_key
        self.num_repeats = num_repeats
        self.caption = caption
        self.is_reg = is_reg
        self.absolute_path = absolute_path
        self.caption_dropout_rate = caption_dropout_rate
        self.image_size: Optional[Tuple[int, int]] = None  # (w, h) of the file
        self.resized_size: Optional[Tuple[int, int]] = None
        self.bucket_reso: Optional[Tuple[int, int]] = None
        self.latents: Optional[np.ndarray] = None  # (4, h/8, w/8) unscaled
        self.latents_flipped: Optional[np.ndarray] = None
        self.latents_npz: Optional[str] = None
        self.latents_original_size: Optional[Tuple[int, int]] = None
        self.latents_crop_ltrb: Optional[Tuple[int, int, int, int]] = None
        self.alpha_mask: Optional[np.ndarray] = None
        self.cond_img_path: Optional[str] = None  # the mask image of a conditioning_data_dir subset
        self.text_encoder_outputs: Optional[List[np.ndarray]] = None  # [hidden1, hidden2, pool2]
        self.text_encoder_outputs_npz: Optional[str] = None
        self.resize_interpolation: Optional[str] = None


class BaseSubset:
    def __init__(self, image_dir: Optional[str] = None, alpha_mask: bool = False, num_repeats: int = 1,
                 shuffle_caption: bool = False, caption_separator: str = ",", keep_tokens: int = 0,
                 keep_tokens_separator: Optional[str] = None, secondary_separator: Optional[str] = None,
                 enable_wildcard: bool = False, color_aug: bool = False, flip_aug: bool = False,
                 face_crop_aug_range: Optional[Tuple[float, float]] = None, random_crop: bool = False,
                 caption_dropout_rate: float = 0.0, caption_dropout_every_n_epochs: int = 0,
                 caption_tag_dropout_rate: float = 0.0, caption_prefix: Optional[str] = None,
                 caption_suffix: Optional[str] = None, token_warmup_min: int = 1, token_warmup_step: float = 0,
                 custom_attributes: Optional[Dict[str, Any]] = None, validation_seed: Optional[int] = None,
                 validation_split: float = 0.0, resize_interpolation: Optional[str] = None) -> None:
        self.image_dir = image_dir
        self.alpha_mask = bool(alpha_mask)
        self.num_repeats = num_repeats
        self.shuffle_caption = shuffle_caption
        self.caption_separator = caption_separator
        self.keep_tokens = keep_tokens
        self.keep_tokens_separator = keep_tokens_separator
        self.secondary_separator = secondary_separator
        self.enable_wildcard = enable_wildcard
        self.color_aug = color_aug
        self.flip_aug = flip_aug
        self.face_crop_aug_range = face_crop_aug_range
        self.random_crop = random_crop
        self.caption_dropout_rate = caption_dropout_rate
        self.caption_dropout_every_n_epochs = caption_dropout_every_n_epochs
        self.caption_tag_dropout_rate = caption_tag_dropout_rate
        self.caption_prefix = caption_prefix
        self.caption_suffix = caption_suffix
        self.token_warmup_min = token_warmup_min
        self.token_warmup_step = token_warmup_step
        self.custom_attributes = custom_attributes if custom_attributes is not None else {}
        self.validation_seed = validation_seed
        self.validation_split = validation_split
        self.resize_interpolation = resize_interpolation
        self.img_count = 0


class DreamBoothSubset(BaseSubset):
    def __init__(self, image_dir: str, is_reg: bool = False, class_tokens: Optional[str] = None,
                 caption_extension: str = ".caption", cache_info: bool = False,
                 conditioning_data_dir: Optional[str] = None, **kwargs) -> None:
        if image_dir is None:
            raise ValueError("image_dir must be specified")
        super().__init__(image_dir=image_dir, **kwargs)
        # kohya's ControlNetSubset (a DreamBooth subset whose images have mask images of the same file
        # stem in this folder; --masked_loss reads their red channel as the loss mask)
        self.conditioning_data_dir = conditioning_data_dir
        self.is_reg = is_reg
        self.class_tokens = class_tokens
        self.caption_extension = caption_extension
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension
        self.cache_info = cache_info

    def __eq__(self, other) -> bool:
        if not isinstance(other, DreamBoothSubset):
            return NotImplemented
        return self.image_dir == other.image_dir

    __hash__ = object.__hash__


class FineTuningSubset(BaseSubset):
    def __init__(self, image_dir: Optional[str] = None, metadata_file: Optional[str] = None, **kwargs) -> None:
        if metadata_file is None:
            raise ValueError("metadata_file must be specified")
        super().__init__(image_dir=image_dir, **kwargs)
        self.metadata_file = metadata_file
        self.is_reg = False

    def __eq__(self, other) -> bool:
        if not isinstance(other, FineTuningSubset):
            return NotImplemented
        return self.metadata_file == other.metadata_file

    __hash__ = object.__hash__
