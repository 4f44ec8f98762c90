"""The three dataset methods, image formats, bad-data pre-flight errors, and the worker loader."""
import json
import os
import random

import pytest

from dataset_helpers import build_group, parse_args, write_image, write_text
from library import config_util, image_utils, train_util
from library.dataset_check import BadDataError, check_weighted_captions
from library.device_utils import UserError


def test_image_formats_and_caption_files(tmp_path):
    d = tmp_path / "imgs"
    for i, (ext, fmt) in enumerate([("png", "PNG"), ("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP"),
                                    ("bmp", "BMP"), ("PNG", "PNG")]):
        write_image(str(d / f"i{i}.{ext}"), 64, 64, seed=i, fmt=fmt)
    write_text(str(d / "i0.caption"), "from caption file\nsecond line ignored\n")
    write_text(str(d / "i1.txt"), "txt is not the default extension")
    write_text(str(d / "notes.gif"), "not an image extension")
    group = build_group(tmp_path, f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{d}'\n"
                             f"  class_tokens = 'sks'\n")
    caps = {os.path.basename(k): info.caption for k, info in group.image_data.items()}
    assert sorted(caps) == ["i0.png", "i1.jpg", "i2.jpeg", "i3.webp", "i4.bmp", "i5.PNG"]
    assert caps["i0.png"] == "from caption file" and caps["i1.jpg"] == "sks"
    train_util.scan_dataset_group(group)
    for i in range(len(group)):
        assert group[i]["images"].shape == (1, 3, 64, 64)


def test_fine_tuning_json_and_jsonl(tmp_path):
    d = tmp_path / "train"
    for i in range(3):
        write_image(str(d / f"img{i}.png"), 64, 64, seed=i)
    write_image(str(tmp_path / "abs.png"), 64, 64)
    jsonl = write_text(str(tmp_path / "meta.jsonl"), "\n".join(json.dumps(x) for x in [
        {"image_path": "img0.png", "caption": "zero", "tags": "t1, t2"},
        {"image_path": str(tmp_path / "abs.png"), "caption": "absolute", "image_size": [64, 64]},
    ]) + "\n")
    meta = write_text(str(tmp_path / "meta.json"), json.dumps({"img1": {"caption": "one"},
                                                              "img2.png": {"tags": "only tags"}}))
    group = build_group(tmp_path, f"""
[general]
resolution = 64
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{d}'
  metadata_file = '{jsonl}'
  [[datasets.subsets]]
  image_dir = '{d}'
  metadata_file = '{meta}'
  caption_separator = ';'
  num_repeats = 2
""")
    caps = {os.path.basename(info.absolute_path): (info.caption, info.num_repeats)
            for info in group.image_data.values()}
    assert caps == {"img0.png": ("zero,t1, t2", 1), "abs.png": ("absolute", 1), "img1.png": ("one", 2),
                    "img2.png": ("only tags", 2)}
    assert group.num_train_images == 2 + 4


def _bad_case(tmp_path, name):
    d = tmp_path / "imgs"
    write_image(str(d / "good.png"), 64, 64)
    bad = d / "bad.png"
    argv = []
    if name == "corrupt":
        write_text(str(bad), "this is not a png")
    elif name == "zero":
        bad.write_bytes(b"")
    elif name == "truncated":
        write_image(str(bad), 64, 64, seed=3)
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif name == "small":
        write_image(str(bad), 48, 64)
    elif name == "large_no_crop":
        write_image(str(bad), 96, 64)
    elif name == "caption":
        write_image(str(bad), 64, 64)
        (d / "bad.caption").write_bytes(b"caf\xe9 latin-1")
    return d, str(bad), argv


@pytest.mark.parametrize("name,message", [
    ("corrupt", "cannot read image"), ("zero", "zero-byte image file"), ("truncated", "corrupt or truncated"),
    ("small", "smaller than the resolution"), ("large_no_crop", "larger than the resolution"),
    ("caption", "not UTF-8"),
])
def test_bad_data_named_before_training(tmp_path, name, message):
    d, bad, argv = _bad_case(tmp_path, name)
    with pytest.raises(UserError) as e:
        group = build_group(tmp_path, f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{d}'\n"
                                 f"  class_tokens = 'x'\n", *argv)
        train_util.scan_dataset_group(group)  # the pre-flight scan, before any step
    text = str(e.value)
    assert message in text and "bad." in text and "\n" not in text


def test_missing_metadata_image_and_pixel_limit(tmp_path, monkeypatch):
    d = tmp_path / "train"
    write_image(str(d / "img0.png"), 64, 64)
    meta = write_text(str(tmp_path / "meta.json"), json.dumps({"img0": {"caption": "a"}, "gone": {"caption": "b"}}))
    with pytest.raises(BadDataError, match="gone.*not found"):
        build_group(tmp_path, f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{d}'\n"
                         f"  metadata_file = '{meta}'\n")
    write_image(str(tmp_path / "big" / "huge.png"), 128, 128)
    group = build_group(tmp_path, f"[[datasets]]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 64\n"
                             f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'big'}'\n  class_tokens = 'x'\n")
    monkeypatch.setattr(image_utils, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(BadDataError, match="huge.png: 128x128 = 16384 pixels exceeds the limit"):
        train_util.scan_dataset_group(group)
    # --weighted_captions: a caption whose weight does not parse is named before training
    write_text(str(d / "img0.txt"), "a (cat:1.2.3) photo")
    group = build_group(tmp_path, f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{d}'\n"
                             f"  caption_extension = '.txt'\n")
    with pytest.raises(BadDataError, match=r"img0.png: caption: bad attention weight ':1.2.3\)'"):
        check_weighted_captions(group)
    write_text(str(d / "img0.txt"), "a (cat:1.2) photo")
    check_weighted_captions(build_group(tmp_path, f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n"
                                             f"  image_dir = '{d}'\n  caption_extension = '.txt'\n"))


def test_cache_restrictions_are_errors(tmp_path):
    write_image(str(tmp_path / "img" / "1_x" / "a.png"), 64, 64)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--random_crop",
                       "--cache_latents_to_disk"])
    group, _ = config_util.build_dataset_groups(args)
    with pytest.raises(UserError, match="color_aug or random_crop"):
        train_util.verify_dataset_args(args, group)
    assert args.cache_latents
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--shuffle_caption",
                       "--cache_text_encoder_outputs", "--network_train_unet_only"])
    group, _ = config_util.build_dataset_groups(args)
    with pytest.raises(UserError, match="shuffle_caption"):
        train_util.verify_dataset_args(args, group)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64",
                       "--cache_text_encoder_outputs_to_disk"])
    group, _ = config_util.build_dataset_groups(args)
    with pytest.raises(UserError, match="network_train_unet_only"):
        train_util.verify_dataset_args(args, group)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--enable_bucket",
                       "--bucket_reso_steps", "48", "--min_bucket_reso", "48", "--max_bucket_reso", "96"])
    group, _ = config_util.build_dataset_groups(args)
    with pytest.raises(UserError, match="divisible by 32"):
        train_util.verify_dataset_args(args, group)


def test_worker_loader_matches_main_process(tmp_path):
    for i in range(5):
        write_image(str(tmp_path / "img" / "2_x" / f"{i}.png"), 64 + 32 * (i % 2), 64, seed=i)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--enable_bucket",
                       "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
                       "--train_batch_size", "2"])
    def fresh_group():
        random.seed(0)
        return config_util.build_dataset_groups(args)[0]

    def epochs(loader, n=2):
        out = []
        for epoch in range(1, n + 1):
            loader.current_epoch.value = epoch
            out.append([(tuple(b["image_keys"]), b["images"].shape, float(b["images"].sum())) for b in loader])
        return out

    ref = epochs(train_util.DataLoader(fresh_group(), num_workers=0, seed=3))
    group = fresh_group()
    loader = train_util.DataLoader(group, num_workers=2, persistent_workers=True, seed=3)
    got = epochs(loader)
    loader.close()
    assert got == ref
    assert ref[0] != ref[1]  # reshuffled per epoch
    assert sorted(len(b[0]) for b in ref[0]) == sorted(len(b[0]) for b in ref[1])

    os.remove(str(tmp_path / "img" / "2_x" / "0.png"))  # vanishes after the scan: the worker's error arrives
    with pytest.raises(UserError, match="0.png"):
        list(train_util.DataLoader(group, num_workers=2, seed=3))


def test_debug_dataset_prints_kohya_lines(tmp_path):
    write_image(str(tmp_path / "img" / "1_sks" / "a.png"), 64, 64)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--debug_dataset"])
    group, _ = config_util.build_dataset_groups(args)
    lines = []
    train_util.debug_dataset(group, printer=lines.append)
    assert lines[0] == "Total dataset length (steps): 1"
    assert any(l.endswith('a.png, size: (64, 64), loss weight: 1.0, caption: "sks", original size: [64, 64], '
                          'crop top left: [0, 0], target size: [64, 64], flipped: False') for l in lines)


def test_cache_info_on_the_command_line_is_the_toml_key(tmp_path):
    """``--cache_info`` (the trainer's own parser, its start check included) means the dataset .toml's
    cache_info: kohya writes metadata_cache.json in the image folder and later runs read sizes and captions
    from it (so a caption edited afterwards is not seen, as in kohya)."""
    from library.train_args import check_not_implemented, parse_args as trainer_args, setup_parser

    write_image(str(tmp_path / "img" / "1_sks" / "a.png"), 64, 48)
    write_text(str(tmp_path / "img" / "1_sks" / "a.caption"), "first caption")
    parser = setup_parser()
    args = trainer_args(parser, ["--train_data_dir", str(tmp_path / "img"), "--resolution", "64", "--cache_info"])
    check_not_implemented(args, parser)
    config_util.build_dataset_groups(args)
    cache = tmp_path / "img" / "1_sks" / "metadata_cache.json"
    (meta,) = json.loads(cache.read_text()).values()
    assert meta == {"caption": "first caption", "resolution": [64, 48]}
    write_text(str(tmp_path / "img" / "1_sks" / "a.caption"), "edited caption")
    group, _ = config_util.build_dataset_groups(args)
    assert [info.caption for info in group.image_data.values()] == ["first caption"]
    args = trainer_args(parser, ["--train_data_dir", str(tmp_path / "img"), "--resolution", "64"])
    group, _ = config_util.build_dataset_groups(args)  # without it, the caption files are read
    assert [info.caption for info in group.image_data.values()] == ["edited caption"]
