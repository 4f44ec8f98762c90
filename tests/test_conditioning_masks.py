"""--masked_loss with mask images from ``conditioning_data_dir`` (kohya's ControlNet subsets, docs/
masked_loss_README.md): the config key, the pairing of images and masks by file stem with its errors, and
the mask in the batch, computed here independently: kohya's ControlNetDataset/apply_masked_loss formula
(conditioning image -> ToTensor/Normalize to [-1, 1], red channel, /2 + 0.5, area-resized to the latents)
written out in numpy/torch.

Images and masks are constant over 2x2 blocks, so the 2x shrinks below are exact in any box/area filter
(PIL's BOX here, OpenCV's INTER_AREA in kohya) and the expected arrays need no resampling code.
"""
import argparse
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset_helpers import CACHE_ARGV, cache_stub_latents, masked_samples, parse_args, write_toml
from library import config_util, train_util
from library.dataset_check import BadDataError
from library.device_utils import UserError


def _blocky(rng, h, w, channels=None):
    """uint8 (h, w[, c]) constant over 2x2 blocks."""
    shape = (h // 2, w // 2) + ((channels,) if channels else ())
    small = rng.integers(0, 256, shape, dtype=np.uint8)
    return np.repeat(np.repeat(small, 2, 0), 2, 1)


def _shrink2(x):
    """The exact 2x box shrink of a 2x2-block-constant array."""
    return x[::2, ::2]


def _group(tmp_path, body, *argv, masked_loss=True):
    cfg = write_toml(tmp_path / "ds.toml", body)
    args = parse_args(["--dataset_config", cfg, *argv])
    args.masked_loss = masked_loss
    random.seed(0)
    group, _ = config_util.build_dataset_groups(args)
    train_util.verify_dataset_args(args, group)
    return args, group


BUCKETS = """
[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
batch_size = 2
caption_extension = ".txt"
"""


@pytest.fixture
def pairs(tmp_path):
    """sq.png 128x128 (bucket 64x64, 2x shrink, no crop) and wide.png 192x128 (same bucket: 2x shrink to
    96x64, then 16 px trimmed from each side), with masks whose green/blue differ from red. The masks are
    saved as RGB (sq) and grayscale (wide: kohya converts it to RGB, so red = the gray value)."""
    rng = np.random.default_rng(11)
    img_dir, mask_dir = tmp_path / "img", tmp_path / "mask"
    img_dir.mkdir()
    mask_dir.mkdir()
    data = {}
    for name, (w, h) in (("sq", (128, 128)), ("wide", (192, 128))):
        rgb = _blocky(rng, h, w, 3)
        mask = _blocky(rng, h, w, 3)
        mask[: h // 4, :, 0] = 0  # a fully masked-out band: the image's colours must survive there
        Image.fromarray(rgb).save(img_dir / f"{name}.png")
        if name == "wide":
            mask = np.repeat(mask[:, :, :1], 3, 2)
            Image.fromarray(mask[:, :, 0], "L").save(mask_dir / f"{name}.png")
        else:
            Image.fromarray(mask).save(mask_dir / f"{name}.png")
        (img_dir / f"{name}.txt").write_text(name)
        data[name] = (rgb, mask)
    return img_dir, mask_dir, data


def _subset(img_dir, mask_dir, extra=""):
    return f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{img_dir}'
  conditioning_data_dir = '{mask_dir}'
  flip_aug = true
{extra}"""


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_mask_image_reaches_the_batch(tmp_path, pairs, cache):
    """batch["alpha_masks"] is the mask's red channel / 255, resized and trimmed with the image's bucket
    and flipped with it; the image pixels are untouched by the mask. For sq (no trim) this is kohya's
    formula exactly; for wide kohya stretches the mask to the bucket instead of trimming it like the image
    (this port keeps them aligned, Limitations.md), checked against the trimmed reference."""
    img_dir, mask_dir, data = pairs
    _, group = _group(tmp_path, BUCKETS + _subset(img_dir, mask_dir), *CACHE_ARGV[cache])
    cache_stub_latents(group, cache)

    expect_mask, expect_rgb = {}, {}
    for name, (rgb, mask) in data.items():
        m, x = _shrink2(mask), _shrink2(rgb)
        if name == "wide":
            m, x = m[:, 16:80], x[:, 16:80]  # centre trim of 96 -> 64
        expect_mask[name], expect_rgb[name] = m, x
    # kohya's formula where it needs no trim: cv2.resize to the bucket (exact 2x area shrink), ToTensor +
    # Normalize, apply_masked_loss's [:, 0] / 2 + 0.5
    cond = torch.tensor(_shrink2(data["sq"][1])).permute(2, 0, 1).float() / 255.0
    kohya_sq = ((cond - 0.5) / 0.5)[0] / 2 + 0.5

    seen = set()
    for batch, j, key, flip, mask in masked_samples(group, cache):
        name = "sq" if key.endswith("sq.png") else "wide"
        want = expect_mask[name][:, :, 0].astype(np.float32) / 255.0
        want = want[:, ::-1] if flip else want
        np.testing.assert_array_equal(mask, want)
        if name == "sq":
            k = kohya_sq.flip(1) if flip else kohya_sq
            np.testing.assert_allclose(mask, k.numpy(), rtol=0, atol=1e-6)
        if cache == "none":
            x = expect_rgb[name][:, ::-1] if flip else expect_rgb[name]
            want_img = (x.astype(np.float32) / 255.0 - 0.5) / 0.5
            np.testing.assert_array_equal(batch["images"][j], want_img.transpose(2, 0, 1))
        seen.add((name, flip))
    assert seen == {("sq", False), ("sq", True), ("wide", False), ("wide", True)}

    # the loss mask (custom_train_functions) is kohya's apply_masked_loss: area interpolation to the latents
    from library import custom_train_functions as ctf

    ref = F.interpolate(torch.tensor(batch["alpha_masks"]).unsqueeze(1), size=(8, 8), mode="area")
    np.testing.assert_allclose(ctf.loss_mask_for_batch(batch, (2, 4, 8, 8)), ref.numpy(), rtol=0, atol=1e-6)
    assert ctf.loss_mask_for_batch(batch, (2, 4, 8, 8)).min() == 0.0  # the masked-out band


def test_mask_resized_to_the_image_without_buckets(tmp_path):
    """Without bucketing kohya resizes a mask of another size to the image (dataset resize_interpolation)."""
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    small = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(small, "L").save(tmp_path / "mask" / "a.png")
    _, group = _group(tmp_path, f"""
[general]
resolution = 64
resize_interpolation = "nearest"
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  conditioning_data_dir = '{tmp_path / "mask"}'
""")
    want = np.repeat(np.repeat(small, 2, 0), 2, 1).astype(np.float32) / 255.0
    np.testing.assert_array_equal(group[0]["alpha_masks"][0], want)


def test_missing_and_extra_masks_are_named(tmp_path, pairs):
    """kohya's ControlNetDataset assertions: images without mask and masks without image, all named."""
    img_dir, mask_dir, _ = pairs
    (mask_dir / "sq.png").unlink()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask_dir / "stray.jpg")
    with pytest.raises(BadDataError) as e:
        _group(tmp_path, BUCKETS + _subset(img_dir, mask_dir))
    msg = str(e.value)
    assert "2 problems" in msg and "sq.png: no mask image sq.*" in msg and "stray.jpg: mask image without" in msg
    with pytest.raises(BadDataError, match="conditioning_data_dir is not a directory"):
        _group(tmp_path, BUCKETS + _subset(img_dir, tmp_path / "nowhere"))


def test_mask_size_must_match_with_buckets(tmp_path, pairs):
    img_dir, mask_dir, _ = pairs
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(mask_dir / "sq.png")
    _, group = _group(tmp_path, BUCKETS + _subset(img_dir, mask_dir))
    with pytest.raises(BadDataError, match=r"sq.png: mask image 100x100 is not the size of its image"):
        train_util.scan_dataset_group(group)


def test_config_key(tmp_path, pairs):
    """Accepted with --masked_loss only (kohya's support_controlnet=args.masked_loss), in every subset of a
    dataset or none, with kohya's ControlNet subset keys (no alpha_mask / class_tokens / is_reg)."""
    img_dir, mask_dir, _ = pairs
    _, group = _group(tmp_path, BUCKETS + _subset(img_dir, mask_dir))
    subset = group.datasets[0].subsets[0]
    assert subset.conditioning_data_dir == str(mask_dir) and not subset.alpha_mask
    assert all(i.cond_img_path for i in group.datasets[0].image_data.values())
    with pytest.raises(UserError, match="needs --masked_loss"):
        _group(tmp_path, BUCKETS + _subset(img_dir, mask_dir), masked_loss=False)
    mixed = _subset(img_dir, mask_dir) + f"  [[datasets.subsets]]\n  image_dir = '{img_dir}'\n"
    with pytest.raises(UserError, match="every subset of"):
        _group(tmp_path, BUCKETS + mixed)
    for key in ("alpha_mask = true", "class_tokens = 'x'", "is_reg = true"):
        with pytest.raises(UserError, match=f"unknown key '{key.split()[0]}'"):
            _group(tmp_path, BUCKETS + _subset(img_dir, mask_dir, "  " + key + "\n"))
    # --alpha_mask on the command line does not reach a ControlNet subset (kohya's has no alpha_mask)
    _, group = _group(tmp_path, BUCKETS + _subset(img_dir, mask_dir), "--alpha_mask")
    assert not group.datasets[0].subsets[0].alpha_mask


def test_masked_loss_start_checks_and_cli_argument(tmp_path, pairs):
    from library import custom_train_functions as ctf
    from library import train_args

    img_dir, mask_dir, _ = pairs
    _, group = _group(tmp_path, BUCKETS + _subset(img_dir, mask_dir))
    ctf.check_loss_args(argparse.Namespace(loss_type="l2", masked_loss=True), group)  # a mask source: fine
    parser = train_args.setup_parser()
    args = parser.parse_args(["--conditioning_data_dir", str(mask_dir)])
    with pytest.raises(UserError, match="--conditioning_data_dir .*conditioning_data_dir in the dataset .toml"):
        train_args.check_not_implemented(args, parser)
