"""Bucket lists, bucket assignment, resize and crop offsets as kohya's algorithm gives them
(expected values worked out by hand from kohya's formulas, see library/bucket_manager.py)."""
import math
import random

import numpy as np
import pytest

from dataset_helpers import parse_args, write_image
from library import config_util
from library.bucket_manager import BucketManager, make_bucket_resolutions
from library.image_utils import trim_and_resize_if_required


def test_bucket_list_small_by_hand():
    # area 4096: square 64; w=32 -> h=min(128, 128//32*32)=128; w=64 -> 64; w=96 -> 42 -> 32; w=128 -> 32
    assert make_bucket_resolutions((64, 64), 32, 128, 32) == [(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]


def test_bucket_list_sdxl_1024():
    resos = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    # widths 256..512 hit the 2048 cap; then h = floor(1048576 / w / 64) * 64
    expected_portrait = [(256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 2048), (576, 1792),
                         (640, 1600), (704, 1472), (768, 1344), (832, 1216), (896, 1152), (960, 1088)]
    # widths above 1024 add (1280, 768), (1408, 704), (1536, 640), (1664, 576), (1728, 576),
    # (1856, 512), (1920, 512), (1984, 512) and their transposes
    extra = [(1280, 768), (1408, 704), (1536, 640), (1664, 576), (1728, 576), (1856, 512), (1920, 512), (1984, 512)]
    expected = set(expected_portrait) | {(h, w) for w, h in expected_portrait} | {(1024, 1024)}
    expected |= set(extra) | {(h, w) for w, h in extra}
    assert resos == sorted(expected)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in resos)


# (image w, h) -> (bucket, resized size, ar error), bucket list of test_bucket_list_small_by_hand
UPSCALE_TABLE = [
    ((64, 64), (64, 64), (64, 64), 0.0),
    # ar 2: ties between (64,64) (err 1) and (96,32) (err 1): the first in sorted order wins
    ((100, 50), (64, 64), (128, 64), -1.0),
    ((300, 100), (96, 32), (96, 32), 0.0),
    ((50, 200), (32, 128), (32, 128), 0.0),
    # ar 0.75 -> (64,64); width-bound: scale 64/45 -> height int(85.33 + 0.5) = 85
    ((45, 60), (64, 64), (64, 85), 1 - 0.75),
    ((128, 32), (128, 32), (128, 32), 0.0),  # exact bucket size is kept
]


@pytest.mark.parametrize("size,bucket,resized,err", UPSCALE_TABLE)
def test_select_bucket_upscale(size, bucket, resized, err):
    bm = BucketManager(False, (64, 64), 32, 128, 32)
    bm.make_buckets()
    got_bucket, got_resized, got_err = bm.select_bucket(*size)
    assert got_bucket == bucket and got_resized == resized
    assert got_err == pytest.approx(err)


NO_UPSCALE_TABLE = [
    # area 5000 > 4096: width sqrt(8192)=90.5 -> 64 (height 32, ar 2); height 45.25 -> 32 (width 64, ar 2):
    # equal errors -> height-rounded branch: (int(32 * 2 + 0.5), 32)
    ((100, 50), (64, 32), (64, 32)),
    ((70, 50), (64, 32), (70, 50)),  # small enough: no resize, bucket rounded down
    ((64, 64), (64, 64), (64, 64)),
    # area 40000: width sqrt(4096*0.25)=32 -> 32, height 128 -> ar 0.25 exact
    ((100, 400), (32, 128), (32, 128)),
]


@pytest.mark.parametrize("size,bucket,resized", NO_UPSCALE_TABLE)
def test_select_bucket_no_upscale(size, bucket, resized):
    bm = BucketManager(True, (64, 64), 32, 128, 32)
    got_bucket, got_resized, _ = bm.select_bucket(*size)
    assert (got_bucket, got_resized) == (bucket, resized)


CROP_TABLE = [
    # bucket wider than image? no (1 < 2): fit width 64, height 32, centred: top (64-32)//2
    ((64, 64), (100, 50), (0, 16, 64, 48)),
    ((64, 32), (100, 50), (0, 0, 64, 32)),
    # bucket ar 1/3 < 0.75: width 32, height 42.67, top (96 - 42.67) // 2 = 26
    ((32, 96), (45, 60), (0, 26, 32, 32 / 0.75 + 26)),
    # bucket ar 2 > image ar 1: height 32, width 32, left (64-32)//2 = 16
    ((64, 32), (50, 50), (16, 0, 48, 32)),
]


@pytest.mark.parametrize("bucket,image,ltrb", CROP_TABLE)
def test_get_crop_ltrb(bucket, image, ltrb):
    assert BucketManager.get_crop_ltrb(bucket, image) == pytest.approx(ltrb)


def test_trim_centre_and_random():
    img = np.arange(50 * 100 * 3, dtype=np.uint8).reshape(50, 100, 3) % 251
    img = img.astype(np.uint8)
    # 100x50 into (64,64) is resized to 128x64, the width trimmed by 64: centre offset 32
    out, original, ltrb = trim_and_resize_if_required(False, img, (64, 64), (128, 64))
    assert out.shape == (64, 64, 3) and original == (100, 50) and ltrb == (0, 16, 64, 48)
    random.seed(3)
    out2, _, _ = trim_and_resize_if_required(True, img, (64, 64), (128, 64))
    assert out2.shape == (64, 64, 3)


def test_dataset_bucket_assignment_and_size_conditioning(tmp_path):
    sizes = {"a": (64, 64), "b": (100, 50), "c": (300, 100), "d": (50, 200), "e": (45, 60)}
    for name, (w, h) in sizes.items():
        write_image(str(tmp_path / "img" / "1_x" / f"{name}.png"), w, h)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--enable_bucket",
                       "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32"])
    random.seed(0)
    group, _ = config_util.build_dataset_groups(args)
    dataset = group.datasets[0]
    by_name = {k.split("/")[-1][0]: info for k, info in dataset.image_data.items()}
    for name, (size, bucket, resized, _) in zip("abcde", UPSCALE_TABLE):
        assert by_name[name].image_size == size
        assert by_name[name].bucket_reso == bucket and by_name[name].resized_size == resized
    assert dataset.bucket_manager.resos == [(32, 128), (64, 64), (96, 32)]
    assert [len(b) for b in dataset.bucket_manager.buckets] == [1, 3, 1]
    assert len(dataset) == 5  # batch size 1: one batch per sample
    seen = {}
    for i in range(len(dataset)):
        ex = dataset[i]
        for j, key in enumerate(ex["image_keys"]):
            seen[key.split("/")[-1][0]] = (ex["original_sizes_hw"][j].tolist(), ex["crop_top_lefts"][j].tolist(),
                                           ex["target_sizes_hw"][j].tolist(), ex["images"].shape)
    # 100x50 in (64,64): original (h, w) = (50, 100), crop top-left (16, 0), target (64, 64)
    assert seen["b"][:3] == ([50, 100], [16, 0], [64, 64])
    # 45x60 in (64,64): bucket ar 1 > 0.75 -> fitted width 48, crop left (64 - 48) // 2 = 8
    assert seen["e"][:3] == ([60, 45], [0, 8], [64, 64])
    assert seen["d"][3][1:] == (3, 128, 32)


def test_flip_crop_left_uses_right_edge(tmp_path):
    write_image(str(tmp_path / "img" / "1_x" / "b.png"), 50, 50)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64,32", "--enable_bucket",
                       "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
                       "--flip_aug"])
    random.seed(1)
    group, _ = config_util.build_dataset_groups(args)
    ds = group.datasets[0]
    info = next(iter(ds.image_data.values()))
    bm = BucketManager(False, (64, 32), 32, 128, 32)
    bm.make_buckets()
    bucket, _, _ = bm.select_bucket(50, 50)
    assert info.bucket_reso == bucket
    l, t, r, b = BucketManager.get_crop_ltrb(bucket, (50, 50))
    flips = set()
    for _ in range(20):
        ex = ds[0]
        flipped = ex["flippeds"][0]
        flips.add(flipped)
        expected_left = bucket[0] - r if flipped else l
        assert ex["crop_top_lefts"][0].tolist() == [int(t), int(expected_left)]
    assert flips == {True, False}


def test_epoch_shuffle_seeded_as_kohya(tmp_path):
    for i in range(6):
        write_image(str(tmp_path / "img" / "2_x" / f"{i}.png"), 64, 64, seed=i)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--train_batch_size", "2"])
    random.seed(42)
    group, _ = config_util.build_dataset_groups(args)
    ds = group.datasets[0]
    assert len(ds) == 6  # 12 samples / batch 2
    ds.set_current_epoch(1)
    order1 = [tuple(ds.batch_image_keys(i)) for i in range(len(ds))]
    # kohya: random.seed(seed + epoch); shuffle batch indices; shuffle each bucket
    random.seed(ds.seed + 1)
    keys = sorted(ds.image_data) * 1
    bucket = [k for k in sorted(ds.image_data) for _ in range(2)]
    # rebuild kohya's state from scratch: make_buckets shuffled with seed 0 + epoch 0 first
    indices = list(range(6))
    random.seed(0)
    random.shuffle(indices)
    random.shuffle(bucket)
    random.seed(ds.seed + 1)
    random.shuffle(indices)
    random.shuffle(bucket)
    expected = [tuple(bucket[i * 2:i * 2 + 2]) for i in indices]
    assert order1 == expected
    assert keys
