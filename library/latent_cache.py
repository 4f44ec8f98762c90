"""Caching of VAE latents and text-encoder outputs (kohya's
``--cache_latents``, ``--cache_latents_to_disk``, ``--vae_batch_size``,
``--cache_text_encoder_outputs(_to_disk)``).

The caches take *callables* so that they do not depend on model internals:

* ``encode_fn(images)``: float32 (B, 3, H, W) in [-1, 1] -> float32
  (B, 4, H/8, W/8) unscaled latents (kohya caches ``latent_dist.sample()``;
  the trainer multiplies by 0.13025). ``make_vae_encode_fn`` builds one from
  ``library.autoencoder_kl.AutoencoderKL``.
* text ``encode_fn(ids1, ids2)``: int64 (B, n, 77) each -> (hidden1 (B, T, 768),
  hidden2 (B, T, 1280), pool2 (B, 1280)) as numpy.

Disk files are kohya's: ``<stem>_<W:04d>x<H:04d>_sdxl.npz`` (W x H the image
file's size) with ``latents``, ``original_size``, ``crop_ltrb``, and
``latents_flipped`` with ``flip_aug`` (and ``alpha_mask``), and
``<stem>_te_outputs.npz`` with ``hidden_state1``, ``hidden_state2``, ``pool2``.
Besides kohya's checks (keys present; we also check the latent shape
against the bucket) we store the image's SHA-1 (``image_sha1``) and the
caption's (``caption_sha1``): a cache whose source changed is recomputed.
kohya-made files (without those keys) are used when their shapes fit.
Files are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from library import image_utils
from library.device_utils import UserError

logger = logging.getLogger(__name__)

SDXL_LATENTS_NPZ_SUFFIX = "_sdxl.npz"
OLD_LATENTS_NPZ_SUFFIX = ".npz"
TEXT_ENCODER_OUTPUTS_NPZ_SUFFIX = "_te_outputs.npz"
LATENTS_STRIDE = 8


# -- file names and validity -------------------------------------------------------
def latents_npz_path(absolute_path: str, image_size: Tuple[int, int]) -> str:
    """kohya's name; an old-style ``<stem>.npz`` next to the image is used when present."""
    stem = os.path.splitext(absolute_path)[0]
    old = stem + OLD_LATENTS_NPZ_SUFFIX
    if os.path.exists(old):
        return old
    return f"{stem}_{image_size[0]:04d}x{image_size[1]:04d}{SDXL_LATENTS_NPZ_SUFFIX}"


def text_encoder_outputs_npz_path(absolute_path: str) -> str:
    return os.path.splitext(absolute_path)[0] + TEXT_ENCODER_OUTPUTS_NPZ_SUFFIX


def file_sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_sha1(text: str, max_token_length=None, weighted: bool = False) -> str:
    # weighted (--weighted_captions) outputs differ from plain ones: a file of the other kind is stale
    key = f"{max_token_length}\nweighted\n{text}" if weighted else f"{max_token_length}\n{text}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def is_disk_cached_latents_expected(bucket_reso: Tuple[int, int], npz_path: str, flip_aug: bool, alpha_mask: bool,
                                    image_path: Optional[str] = None, skip_check: bool = False) -> bool:
    """True when ``npz_path`` holds usable latents for this bucket and image."""
    if not os.path.exists(npz_path):
        return False
    if skip_check:
        return True
    expected = (bucket_reso[1] // LATENTS_STRIDE, bucket_reso[0] // LATENTS_STRIDE)
    try:
        with np.load(npz_path) as npz:
            keys = set(npz.files)
            if not {"latents", "original_size", "crop_ltrb"} <= keys:
                return False
            if tuple(npz["latents"].shape[1:3]) != expected:
                return False
            if flip_aug and ("latents_flipped" not in keys or tuple(npz["latents_flipped"].shape[1:3]) != expected):
                return False
            if alpha_mask != ("alpha_mask" in keys):
                return False
            if image_path is not None and "image_sha1" in keys and str(npz["image_sha1"]) != file_sha1(image_path):
                return False
    except (OSError, ValueError, EOFError) as e:
        logger.warning(f"unreadable latents cache {npz_path} ({e}): recomputing")
        return False
    return True


def _save_npz_atomic(path: str, **arrays):
    from library.path_utils import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


def save_latents_to_disk(npz_path, latents, original_size, crop_ltrb, flipped_latents=None, alpha_mask=None,
                         image_sha1=None):
    arrays = {"latents": np.asarray(latents, np.float32), "original_size": np.array(original_size),
              "crop_ltrb": np.array(crop_ltrb)}
    if flipped_latents is not None:
        arrays["latents_flipped"] = np.asarray(flipped_latents, np.float32)
    if alpha_mask is not None:
        arrays["alpha_mask"] = np.asarray(alpha_mask, np.float32)
    if image_sha1 is not None:
        arrays["image_sha1"] = np.array(image_sha1)
    _save_npz_atomic(npz_path, **arrays)


def load_latents_from_disk(npz_path: str):
    """-> (latents, original_size [w, h], crop_ltrb, latents_flipped or None, alpha_mask or None)."""
    try:
        with np.load(npz_path) as npz:
            if "latents" not in npz.files:
                raise UserError(f"latents cache {npz_path} has no 'latents' (old format?): delete it to recompute")
            return (npz["latents"], npz["original_size"].tolist(), npz["crop_ltrb"].tolist(),
                    npz["latents_flipped"] if "latents_flipped" in npz.files else None,
                    npz["alpha_mask"] if "alpha_mask" in npz.files else None)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read latents cache {npz_path}: {e}") from e


# -- VAE ------------------------------------------------------------------------------
def make_vae_encode_fn(vae, sample: bool = True, seed: Optional[int] = None,
                       encoder=None) -> Callable[[np.ndarray], np.ndarray]:
    """``encode_fn`` for an ``AutoencoderKL``: posterior sample (kohya) or mean, unscaled.

    The sampling noise comes from a numpy generator seeded with ``seed``. ``encoder``: what computes the
    posterior, float32 images -> float32 (mean, logvar) numpy (e.g. a ``vae_encode_process.EncoderProcess``);
    default: the VAE's segmented encoder in this process."""
    rng = np.random.default_rng(seed)
    encoder = encoder if encoder is not None else in_process_encoder(vae)

    def encode_fn(images: np.ndarray) -> np.ndarray:
        mean, logvar = encoder(np.ascontiguousarray(images, np.float32))
        if not sample:
            return mean
        noise = rng.standard_normal(mean.shape).astype(np.float32)
        return (mean + np.exp(0.5 * logvar) * noise).astype(np.float32)

    encode_fn.rng = rng  # its state is part of a saved training state
    return encode_fn


def in_process_encoder(vae):
    """float32 images -> float32 (mean, logvar) numpy with the VAE's segmented encoder in this process."""
    import mindspore as ms

    from library.vae_segments import SegmentedEncode

    vae.set_train(False)
    encoder = SegmentedEncode(vae)  # one graph per layer: the memory pool stays small (see vae_segments)
    dtype = next(iter(vae.get_parameters())).dtype

    def encode(images):
        mean, logvar = encoder(ms.Tensor(images).astype(dtype))
        return mean.astype(ms.float32).asnumpy(), logvar.astype(ms.float32).asnumpy()

    return encode


def _load_for_caching(info, alpha: bool, random_crop: bool):
    img = image_utils.load_image(info.absolute_path, alpha)
    img, original_size, crop_ltrb = image_utils.trim_and_resize_if_required(
        random_crop, img, info.bucket_reso, info.resized_size, info.resize_interpolation)
    mask = None
    if alpha:
        mask = img[:, :, 3].astype(np.float32) / 255.0 if img.shape[2] == 4 else np.ones(img.shape[:2], np.float32)
    return image_utils.to_chw_float(img[:, :, :3]), mask, original_size, crop_ltrb


def cache_batch_latents(encode_fn, infos: Sequence, flip_aug: bool, alpha: bool, random_crop: bool,
                        cache_to_disk: bool):
    loaded = [_load_for_caching(info, alpha, random_crop) for info in infos]
    images = np.stack([x[0] for x in loaded])
    latents = np.asarray(encode_fn(images), np.float32)
    flipped = np.asarray(encode_fn(np.ascontiguousarray(images[:, :, :, ::-1])), np.float32) if flip_aug else None
    for i, (info, (_, mask, original_size, crop_ltrb)) in enumerate(zip(infos, loaded)):
        if np.isnan(latents[i]).any() or (flipped is not None and np.isnan(flipped[i]).any()):
            raise UserError(f"NaN in the latents of {info.absolute_path}: the VAE (computing in float32) "
                            f"gave NaN for this image; check the image and the VAE weights")
        if cache_to_disk:
            save_latents_to_disk(info.latents_npz, latents[i], original_size, crop_ltrb,
                                 None if flipped is None else flipped[i], mask, file_sha1(info.absolute_path))
        else:
            info.latents_original_size = original_size
            info.latents_crop_ltrb = crop_ltrb
            info.latents = latents[i]
            info.latents_flipped = None if flipped is None else flipped[i]
            info.alpha_mask = mask


def latents_to_compute(dataset, cache_to_disk: bool = False, skip_cache_check: bool = False) -> list:
    """The images of ``dataset`` whose latents must be computed: all of them in memory; on disk those
    without a valid cache file (``info.latents_npz`` is set to kohya's file name for every image)."""
    todo = []
    for info in dataset.image_data.values():
        if cache_to_disk:
            subset = dataset.image_to_subset[info.image_key]
            info.latents_npz = latents_npz_path(info.absolute_path, info.image_size)
            if is_disk_cached_latents_expected(info.bucket_reso, info.latents_npz, subset.flip_aug,
                                               subset.alpha_mask, info.absolute_path, skip_cache_check):
                continue
        todo.append(info)
    return todo


def cache_latents(dataset, encode_fn, vae_batch_size: int = 1, cache_to_disk: bool = False,
                  skip_cache_check: bool = False, todo: Optional[list] = None):
    """Cache every image's latents (in memory, or on disk reusing valid files).

    Batches hold images of one bucket with the same flip/alpha/crop settings,
    at most ``vae_batch_size`` each, in order of bucket area (kohya).
    ``todo``: ``latents_to_compute``'s answer when the caller already has it."""
    from tqdm import tqdm

    if vae_batch_size < 1:
        raise UserError(f"--vae_batch_size must be >= 1, got {vae_batch_size}")
    if todo is None:
        todo = latents_to_compute(dataset, cache_to_disk, skip_cache_check)
    infos = sorted(todo, key=lambda info: info.bucket_reso[0] * info.bucket_reso[1])
    batches: List[Tuple[tuple, list]] = []
    batch, condition = [], None
    for info in infos:
        subset = dataset.image_to_subset[info.image_key]
        cond = (info.bucket_reso, subset.flip_aug, subset.alpha_mask, subset.random_crop)
        if batch and cond != condition:
            batches.append((condition, batch))
            batch = []
        batch.append(info)
        condition = cond
        if len(batch) >= vae_batch_size:
            batches.append((condition, batch))
            batch, condition = [], None
    if batch:
        batches.append((condition, batch))
    if cache_to_disk:
        logger.info(f"latents cache: {len(dataset.image_data) - len(todo)} valid file(s) reused, "
                    f"{len(todo)} to compute")
    with tqdm(total=len(todo), desc="caching latents", unit="img", disable=not todo, dynamic_ncols=True) as bar:
        for (reso, flip_aug, alpha, random_crop), batch in batches:
            cache_batch_latents(encode_fn, batch, flip_aug, alpha, random_crop, cache_to_disk)
            bar.update(len(batch))


# -- text encoders -------------------------------------------------------------------
def is_disk_cached_text_encoder_outputs_expected(npz_path: str, caption_hash: Optional[str] = None,
                                                 skip_check: bool = False) -> bool:
    if not os.path.exists(npz_path):
        return False
    if skip_check:
        return True
    try:
        with np.load(npz_path) as npz:
            if not {"hidden_state1", "hidden_state2", "pool2"} <= set(npz.files):
                return False
            if caption_hash is not None and "caption_sha1" in npz.files and str(npz["caption_sha1"]) != caption_hash:
                return False
    except (OSError, ValueError, EOFError) as e:
        logger.warning(f"unreadable text encoder cache {npz_path} ({e}): recomputing")
        return False
    return True


def load_text_encoder_outputs_from_disk(npz_path: str) -> List[np.ndarray]:
    try:
        with np.load(npz_path) as npz:
            return [npz["hidden_state1"], npz["hidden_state2"], npz["pool2"]]
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise UserError(f"cannot read text encoder cache {npz_path}: {e}") from e


def text_encoder_outputs_to_compute(dataset, max_token_length=None, cache_to_disk: bool = False,
                                    skip_cache_check: bool = False, weighted: bool = False) -> list:
    """The images whose captions must be encoded: all of them in memory; on disk those without a valid
    cache file (``info.text_encoder_outputs_npz`` is set for every image)."""
    todo = []
    for info in dataset.image_data.values():
        if cache_to_disk:
            info.text_encoder_outputs_npz = text_encoder_outputs_npz_path(info.absolute_path)
            if is_disk_cached_text_encoder_outputs_expected(info.text_encoder_outputs_npz,
                                                            text_sha1(info.caption, max_token_length, weighted),
                                                            skip_cache_check):
                continue
        todo.append(info)
    return todo


def cache_text_encoder_outputs(dataset, encode_fn, tokenizers, max_token_length=None, cache_to_disk: bool = False,
                               batch_size: Optional[int] = None, skip_cache_check: bool = False,
                               todo: Optional[list] = None, weighted: bool = False):
    """Cache the text encoders' outputs for every image's (unprocessed) caption.
    ``todo``: ``text_encoder_outputs_to_compute``'s answer when the caller already has it.
    ``weighted`` (``--weighted_captions``): captions tokenised with their ``(word:1.2)`` weights and
    ``encode_fn`` called as (ids1, ids2, weights1, weights2)."""
    from tqdm import tqdm

    from library.token_chunking import tokenize_sdxl

    batch_size = batch_size or dataset.batch_size
    if todo is None:
        todo = text_encoder_outputs_to_compute(dataset, max_token_length, cache_to_disk, skip_cache_check, weighted)
    if cache_to_disk:
        logger.info(f"text encoder outputs cache: {len(dataset.image_data) - len(todo)} valid file(s) reused, "
                    f"{len(todo)} to compute")
    with tqdm(total=len(todo), desc="caching text encoder outputs", unit="img", disable=not todo,
              dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            captions = [info.caption for info in batch]
            if weighted:
                from library.prompt_weighting import tokenize_sdxl_weighted

                ids, token_weights = tokenize_sdxl_weighted(captions, tokenizers, max_token_length)
                outputs = encode_fn(*ids, *token_weights)
            else:
                outputs = encode_fn(*tokenize_sdxl(captions, tokenizers, max_token_length))
            hidden1, hidden2, pool2 = (np.asarray(x, np.float32) for x in outputs)
            for i, info in enumerate(batch):
                if cache_to_disk:
                    _save_npz_atomic(info.text_encoder_outputs_npz, hidden_state1=hidden1[i],
                                     hidden_state2=hidden2[i], pool2=pool2[i],
                                     caption_sha1=np.array(text_sha1(info.caption, max_token_length, weighted)))
                else:
                    info.text_encoder_outputs = [hidden1[i], hidden2[i], pool2[i]]
            bar.update(len(batch))
