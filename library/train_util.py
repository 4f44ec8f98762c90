"""kohya's ``train_util`` names for the dataset side, and the dataset command-line
arguments. kohya's 6000-line module is split by topic; its public dataset names
are re-exported here so that ``from library.train_util import BucketManager``
keeps working:

* ``library.bucket_manager``: BucketManager, make_bucket_resolutions
* ``library.caption_utils``: caption files and ``process_caption``
* ``library.image_utils``: image files, resize/trim, colour augmentation
* ``library.dataset_subsets`` / ``dataset_base`` / ``dataset_dreambooth`` /
  ``dataset_finetuning`` / ``dataset_group``: the datasets, ``debug_dataset``
* ``library.dataset_check``: the pre-flight scan of the training data
* ``library.latent_cache``: latents and text-encoder output caches
* ``library.data_loader``: batches with worker processes
"""
from __future__ import annotations

import argparse
import logging
import math

from library.bucket_manager import BucketBatchIndex, BucketManager, make_bucket_resolutions  # noqa: F401
from library.caption_utils import process_caption, read_caption  # noqa: F401
from library.data_loader import DataLoader  # noqa: F401
from library.dataset_base import BaseDataset  # noqa: F401
from library.dataset_check import BadDataError, scan_dataset_group  # noqa: F401
from library.dataset_dreambooth import DreamBoothDataset, split_train_val  # noqa: F401
from library.dataset_finetuning import FineTuningDataset  # noqa: F401
from library.dataset_group import DatasetGroup, debug_dataset  # noqa: F401
from library.dataset_subsets import BaseSubset, DreamBoothSubset, FineTuningSubset, ImageInfo  # noqa: F401
from library.device_utils import UserError
from library.image_utils import (IMAGE_EXTENSIONS, glob_images, load_image,  # noqa: F401
                                 trim_and_resize_if_required)
from library.latent_cache import (cache_latents, cache_text_encoder_outputs,  # noqa: F401
                                  is_disk_cached_latents_expected, make_vae_encode_fn)

logger = logging.getLogger(__name__)

# SDXL's UNet needs bucket sides divisible by 32 (kohya's sdxl_train_network).
SDXL_BUCKET_RESO_STEPS_DIVISOR = 32


def add_dataset_arguments(parser: argparse.ArgumentParser, support_dreambooth: bool = True,
                          support_caption: bool = True, support_caption_dropout: bool = True):
    """kohya's dataset arguments (same names, defaults and meaning)."""
    add = parser.add_argument
    add("--train_data_dir", type=str, default=None, help="directory for train images")
    add("--cache_info", action="store_true",
        help="cache meta information (caption and image size) in metadata_cache.json of each image folder for "
             "faster dataset loading (DreamBooth subsets only; the default of the dataset .toml's cache_info)")
    add("--shuffle_caption", action="store_true", help="shuffle separated caption")
    add("--caption_separator", type=str, default=",", help="separator for caption")
    add("--caption_extension", type=str, default=".caption", help="extension of caption files")
    add("--caption_extention", type=str, default=None,
        help="extension of caption files (backward compatibility spelling)")
    add("--keep_tokens", type=int, default=0, help="keep heading N tokens when shuffling caption tokens")
    add("--keep_tokens_separator", type=str, default="",
        help="separator between the fixed (not shuffled) and the flexible part of a caption")
    add("--secondary_separator", type=str, default=None,
        help="secondary separator, replaced by caption_separator after dropping/shuffling")
    add("--enable_wildcard", action="store_true", help="enable wildcard for caption (e.g. '{image|picture}')")
    add("--caption_prefix", type=str, default=None, help="prefix for caption text")
    add("--caption_suffix", type=str, default=None, help="suffix for caption text")
    add("--color_aug", action="store_true", help="enable weak color augmentation")
    add("--flip_aug", action="store_true", help="enable horizontal flip augmentation")
    add("--face_crop_aug_range", type=str, default=None,
        help="enable face-centered crop augmentation and its range (e.g. 2.0,4.0)")
    add("--random_crop", action="store_true", help="enable random crop")
    add("--debug_dataset", action="store_true",
        help="print one epoch of batches (image keys, sizes, captions) and stop: no model is loaded, nothing is "
             "written, no training")
    add("--resolution", type=str, default=None, help="resolution in training ('size' or 'width,height')")
    add("--cache_latents", action="store_true",
        help="cache latents to main memory (color_aug and random_crop must be disabled)")
    add("--vae_batch_size", type=int, default=1, help="batch size for caching latents")
    add("--cache_latents_to_disk", action="store_true",
        help="cache latents to disk (<image stem>_<W>x<H>_sdxl.npz), reused when still valid")
    add("--skip_cache_check", action="store_true",
        help="skip the content validation of cache files (their existence is always checked)")
    add("--enable_bucket", action="store_true", help="enable buckets for multi aspect ratio training")
    add("--min_bucket_reso", type=int, default=256, help="minimum resolution for buckets")
    add("--max_bucket_reso", type=int, default=1024, help="maximum resolution for buckets")
    add("--bucket_reso_steps", type=int, default=64,
        help="steps of resolution for buckets (a multiple of 32 for SDXL)")
    add("--bucket_no_upscale", action="store_true", help="make bucket for each image without upscaling")
    add("--resize_interpolation", type=str, default=None,
        choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"],
        help="resize interpolation (default: area when shrinking, lanczos when enlarging)")
    add("--token_warmup_min", type=int, default=1, help="start learning at N tags")
    add("--token_warmup_step", type=float, default=0,
        help="tag length reaches maximum on N steps (or N*max_train_steps if N<1)")
    add("--alpha_mask", action="store_true", help="use alpha channel as mask for training")
    add("--dataset_class", type=str, default=None,
        help="dataset class for arbitrary dataset (not supported in this port)")
    if support_caption_dropout:
        add("--caption_dropout_rate", type=float, default=0.0, help="rate of dropping out the whole caption")
        add("--caption_dropout_every_n_epochs", type=int, default=0, help="drop out all captions every N epochs")
        add("--caption_tag_dropout_rate", type=float, default=0.0, help="rate of dropping out comma separated tags")
    if support_dreambooth:
        add("--reg_data_dir", type=str, default=None, help="directory for regularization images")
    if support_caption:
        add("--in_json", type=str, default=None, help="json metadata for dataset")
        add("--dataset_repeats", type=int, default=1, help="repeat dataset when training with captions")


def add_data_loader_arguments(parser: argparse.ArgumentParser):
    """kohya's loader arguments (in its add_training_arguments)."""
    parser.add_argument("--max_data_loader_n_workers", type=int, default=8,
                        help="max num workers for DataLoader (lower is less main RAM usage, slower epoch start)")
    parser.add_argument("--persistent_data_loader_workers", action="store_true",
                        help="persistent DataLoader workers (faster epoch start, more memory)")


def add_text_encoder_cache_arguments(parser: argparse.ArgumentParser):
    """kohya's SDXL text-encoder cache arguments (in its add_sdxl_training_arguments)."""
    parser.add_argument("--cache_text_encoder_outputs", action="store_true",
                        help="cache text encoder outputs (caption shuffle/dropout and text encoder training "
                             "are not possible then)")
    parser.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                        help="cache text encoder outputs to disk (<image stem>_te_outputs.npz)")


def prepare_dataset_args(args: argparse.Namespace, support_metadata: bool = True):
    """kohya's normalisation of dataset arguments (resolution and face crop range to tuples)."""
    if getattr(args, "caption_extention", None) is not None:
        args.caption_extension = args.caption_extention
        args.caption_extention = None
    if getattr(args, "dataset_class", None) is not None:
        raise UserError("--dataset_class (arbitrary dataset classes) is not supported by this port")
    if isinstance(getattr(args, "resolution", None), str):
        from library.config_util import parse_resolution
        args.resolution = parse_resolution(args.resolution)
    if isinstance(getattr(args, "face_crop_aug_range", None), str):
        try:
            rng = tuple(float(r) for r in args.face_crop_aug_range.split(","))
        except ValueError:
            rng = ()
        if len(rng) != 2 or rng[0] > rng[1]:
            raise UserError(f"--face_crop_aug_range must be 'low,high' with low <= high, got "
                            f"{args.face_crop_aug_range!r}")
        args.face_crop_aug_range = rng
    if support_metadata and getattr(args, "in_json", None) is not None and (args.color_aug or args.random_crop):
        logger.warning("latents in npz is ignored when color_aug or random_crop is True")


def verify_dataset_args(args: argparse.Namespace, train_dataset_group, val_dataset_group=None,
                        network_train_unet_only: bool = None):
    """kohya's checks of caching against the dataset, raised as UserError before any model work.

    ``--cache_latents_to_disk`` turns ``--cache_latents`` on and
    ``--cache_text_encoder_outputs_to_disk`` turns ``--cache_text_encoder_outputs`` on, as kohya."""
    groups = [g for g in (train_dataset_group, val_dataset_group) if g is not None]
    if getattr(args, "cache_latents_to_disk", False) and not args.cache_latents:
        args.cache_latents = True
        logger.warning("cache_latents_to_disk is enabled, so cache_latents is also enabled")
    if getattr(args, "cache_text_encoder_outputs_to_disk", False) and not getattr(args, "cache_text_encoder_outputs",
                                                                                 False):
        args.cache_text_encoder_outputs = True
        logger.warning("cache_text_encoder_outputs is enabled because cache_text_encoder_outputs_to_disk is enabled")
    if getattr(args, "cache_latents", False) and not all(g.is_latent_cacheable() for g in groups):
        raise UserError("when caching latents, either color_aug or random_crop cannot be used")
    if getattr(args, "cache_text_encoder_outputs", False):
        if not all(g.is_text_encoder_output_cacheable() for g in groups):
            raise UserError("when caching Text Encoder output, either caption_dropout_rate, shuffle_caption, "
                            "token_warmup_step or caption_tag_dropout_rate cannot be used")
        unet_only = (network_train_unet_only if network_train_unet_only is not None
                     else getattr(args, "network_train_unet_only", False))
        if not unet_only:
            raise UserError("network for Text Encoder cannot be trained with caching Text Encoder outputs "
                            "(add --network_train_unet_only)")
    if getattr(args, "vae_batch_size", 1) < 1:
        raise UserError(f"--vae_batch_size must be >= 1, got {args.vae_batch_size}")
    for g in groups:
        g.verify_bucket_reso_steps(SDXL_BUCKET_RESO_STEPS_DIVISOR)


def num_update_steps_per_epoch(num_batches: int, gradient_accumulation_steps: int = 1) -> int:
    """kohya: ceil(len(train_dataloader) / gradient_accumulation_steps)."""
    return math.ceil(num_batches / gradient_accumulation_steps)


def max_train_steps_for_epochs(max_train_epochs: int, num_batches: int, num_processes: int = 1,
                               gradient_accumulation_steps: int = 1) -> int:
    """kohya's --max_train_epochs override: epochs * ceil(batches / processes / grad_accum)."""
    return max_train_epochs * math.ceil(num_batches / num_processes / gradient_accumulation_steps)


def num_train_epochs(max_train_steps: int, num_batches: int, gradient_accumulation_steps: int = 1) -> int:
    """kohya: ceil(max_train_steps / num_update_steps_per_epoch)."""
    return math.ceil(max_train_steps / num_update_steps_per_epoch(num_batches, gradient_accumulation_steps))


def initial_update_step(args, num_batches: int, gradient_accumulation_steps: int = 1):
    """kohya's initial step: ``--initial_step``, else ``(--initial_epoch - 1) * update steps per epoch``; None
    when neither is given."""
    if getattr(args, "initial_step", None) is not None:
        return int(args.initial_step)
    if getattr(args, "initial_epoch", None) is not None:
        return (int(args.initial_epoch) - 1) * num_update_steps_per_epoch(num_batches, gradient_accumulation_steps)
    return None


def check_initial_step_args(args):
    """At start: the model-free checks of --initial_step/--initial_epoch/--skip_until_initial_step."""
    initial_given = args.initial_step is not None or args.initial_epoch is not None
    if args.initial_step is not None and args.initial_step < 0:
        raise UserError(f"--initial_step must be >= 0, got {args.initial_step}")
    if args.initial_epoch is not None and args.initial_epoch < 1:
        raise UserError(f"--initial_epoch must be >= 1 (1 is the first epoch), got {args.initial_epoch}")
    if args.skip_until_initial_step and not initial_given:
        raise UserError("--skip_until_initial_step needs --initial_step or --initial_epoch")
    if initial_given and getattr(args, "resume", None) is not None:
        # kohya lets them override the state's step; here resume restores the exact step and batch position
        raise UserError("--initial_step/--initial_epoch cannot be combined with --resume (the state's step and "
                        "batch position are used)")


def check_initial_step(args, num_batches: int, gradient_accumulation_steps: int = 1):
    """kohya's assert, as a UserError: the initial step must leave steps to train. Returns the initial step."""
    initial = initial_update_step(args, num_batches, gradient_accumulation_steps)
    max_steps = args.max_train_steps
    if getattr(args, "max_train_epochs", None) is not None:
        max_steps = max_train_steps_for_epochs(args.max_train_epochs, num_batches, 1, gradient_accumulation_steps)
    if initial is not None and initial > 0 and max_steps <= initial:
        raise UserError(f"max_train_steps should be greater than initial step: {max_steps} vs {initial} "
                        f"(--initial_step/--initial_epoch)")
    return initial
