"""Dataset config: schema errors naming key and section, fallback order, command-line-only mode,
and the README's three dataset methods."""
import json
import random

import pytest

from dataset_helpers import build_group, parse_args, write_image, write_text, write_toml
from library import config_util
from library.device_utils import UserError


@pytest.fixture
def folder(tmp_path):
    for i in range(2):
        write_image(str(tmp_path / "imgs" / f"img{i}.png"), 64, 64, seed=i)
    return tmp_path / "imgs"


@pytest.mark.parametrize("snippet,where", [
    ("[general]\nresolutoin = 64\n", "[general]"),
    ("[[datasets]]\nresolution = 64\nbatchsize = 2\n", "[[datasets]] #1"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'x'\n  num_repeat = 3\n",
     "[[datasets.subsets]] #1 of [[datasets]] #1"),
    ("[[datasets]]\nresolution = 64\nprior_loss_weight = 1.0\n", "[[datasets]] #1"),  # argparse-only in kohya
])
def test_unknown_key_names_key_and_section(tmp_path, snippet, where):
    with pytest.raises(UserError) as e:
        build_group(tmp_path, snippet)
    key = [line.split("=")[0].strip() for line in snippet.splitlines() if "=" in line][-1]
    assert f"unknown key '{key}' in {where}" in str(e.value)


def test_unknown_section_and_bad_types(tmp_path):
    with pytest.raises(UserError, match="unknown section 'dataset'"):
        build_group(tmp_path, "[[dataset]]\nresolution = 64\n")
    with pytest.raises(UserError, match="'num_repeats' in .*must be an integer"):
        build_group(tmp_path, "[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'x'\n"
                         "  num_repeats = 'ten'\n")
    with pytest.raises(UserError, match="'resolution' in \\[general\\]"):
        build_group(tmp_path, "[general]\nresolution = [1, 2, 3]\n")
    with pytest.raises(UserError, match="'image_dir' is required"):
        build_group(tmp_path, "[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  class_tokens = 'x'\n")
    with pytest.raises(UserError, match="cannot be mixed"):
        build_group(tmp_path, "[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = 'x'\n"
                         "  [[datasets.subsets]]\n  metadata_file = 'm.json'\n")
    with pytest.raises(UserError, match="unknown key 'class_tokens'"):  # not a fine-tuning key
        build_group(tmp_path, "[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  metadata_file = 'm.json'\n"
                         "  class_tokens = 'x'\n")
    with pytest.raises(UserError, match="cannot parse dataset config"):
        build_group(tmp_path, "[[datasets]\n")
    with pytest.raises(UserError, match="not found"):
        config_util.load_user_config(tmp_path / "missing.toml")


def test_fallback_order(tmp_path, folder):
    # keep_tokens: subset 1 / dataset 2 / general 3 / command line 4 / default 0
    text = f"""
[general]
keep_tokens = 3
flip_aug = true
resolution = [64, 64]
[[datasets]]
keep_tokens = 2
  [[datasets.subsets]]
  image_dir = '{folder}'
  keep_tokens = 1
  [[datasets.subsets]]
  image_dir = '{folder}_b'
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{folder}_c'
"""
    for name in ("imgs_b", "imgs_c"):
        write_image(str(tmp_path / name / "x.png"), 64, 64)
    group = build_group(tmp_path, text, "--keep_tokens", "4", "--caption_prefix", "cli", "--resolution", "128")
    d1, d2 = group.datasets
    assert [s.keep_tokens for s in d1.subsets] == [1, 2]
    assert [s.keep_tokens for s in d2.subsets] == [3]
    assert all(s.caption_prefix == "cli" for d in group.datasets for s in d.subsets)  # command line
    assert all(s.flip_aug for d in group.datasets for s in d.subsets)  # general
    assert all(s.caption_extension == ".caption" and s.num_repeats == 1 for s in d1.subsets)  # defaults
    assert (d1.width, d1.height) == (64, 64)  # general beats the command line

    group = build_group(tmp_path, f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{folder}'\n",
                   "--resolution", "128,64")
    assert (group.datasets[0].width, group.datasets[0].height) == (128, 64)


def test_json_config_same_as_toml(tmp_path, folder):
    cfg = {"general": {"resolution": 64}, "datasets": [{"subsets": [{"image_dir": str(folder), "num_repeats": 3,
                                                                     "class_tokens": "sks"}]}]}
    path = write_text(str(tmp_path / "ds.json"), json.dumps(cfg))
    random.seed(0)
    group, _ = config_util.build_dataset_groups(parse_args(["--dataset_config", path]))
    assert group.num_train_images == 6
    assert {info.caption for info in group.image_data.values()} == {"sks"}


def test_dataset_config_with_command_line_data_is_refused(tmp_path, folder):
    path = write_toml(tmp_path / "ds.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folder}'\n")
    with pytest.raises(UserError, match="--train_data_dir cannot be combined with --dataset_config"):
        config_util.build_dataset_groups(parse_args(["--dataset_config", path, "--train_data_dir", str(folder)]))


def test_command_line_dreambooth_folders(tmp_path):
    write_image(str(tmp_path / "train" / "10_sks dog" / "a.png"), 64, 64)
    write_image(str(tmp_path / "train" / "3_my_thing" / "b.jpg"), 64, 64)
    write_image(str(tmp_path / "train" / "notes" / "c.png"), 64, 64)  # no repeats prefix: ignored
    write_image(str(tmp_path / "reg" / "1_dog" / "r.png"), 64, 64)
    subsets = config_util.generate_dreambooth_subsets_config_by_subdirs(str(tmp_path / "train"), str(tmp_path / "reg"))
    assert [(s["num_repeats"], s["class_tokens"], s["is_reg"]) for s in subsets] == [
        (10, "sks dog", False), (3, "my_thing", False), (1, "dog", True)]
    random.seed(0)
    group, _ = config_util.build_dataset_groups(parse_args(["--train_data_dir", tmp_path / "train", "--reg_data_dir",
                                                            tmp_path / "reg", "--resolution", "64"]))
    assert (group.num_train_images, group.num_reg_images) == (13, 1)
    with pytest.raises(UserError, match="--train_data_dir is not a directory"):
        config_util.build_dataset_groups(parse_args(["--train_data_dir", tmp_path / "nope", "--resolution", "64"]))
    with pytest.raises(UserError, match="No data found"):
        (tmp_path / "empty").mkdir()
        config_util.build_dataset_groups(parse_args(["--train_data_dir", tmp_path / "empty", "--resolution", "64"]))


def test_command_line_in_json(tmp_path, folder):
    meta = write_text(str(tmp_path / "meta.json"), json.dumps({"img0": {"caption": "a cat"},
                                                               "img1.png": {"caption": "a dog", "tags": "x, y"}}))
    random.seed(0)
    group, _ = config_util.build_dataset_groups(parse_args(["--train_data_dir", folder, "--in_json", meta,
                                                            "--resolution", "64", "--dataset_repeats", "2"]))
    assert group.num_train_images == 4
    assert sorted(info.caption for info in group.image_data.values()) == ["a cat", "a dog,x, y"]


# The three methods as the README (/work/shared/SEED_README.md) writes them, with real folders.
def _butterflies(tmp_path, captions=False):
    d = tmp_path / "data_path" / "butterfly"
    for i in range(711, 716):
        write_image(str(d / f"img{i}.png"), 80, 72, seed=i)
        if captions:
            write_text(str(d / f"img{i}.txt"), f"a picture of butterfly {i}\n")
    reg = tmp_path / "reg"
    write_image(str(reg / "r0.png"), 64, 64)
    return d, reg


def test_readme_method_1_class_tokens(tmp_path):
    d, reg = _butterflies(tmp_path)
    group = build_group(tmp_path, f"""
[general]
enable_bucket = false                        # Whether to use Aspect Ratio Bucketing

[[datasets]]
resolution = 64                              # Training resolution
batch_size = 1                               # Batch size

  [[datasets.subsets]]
  random_crop = true
  image_dir = '{d}'
  class_tokens = 'Pokemon butterfly'
  num_repeats = 10

  [[datasets.subsets]]
  is_reg = true
  random_crop = true
  image_dir = '{reg}'
  class_tokens = 'butterfly'
  num_repeats = 1
""")
    assert (group.num_train_images, group.num_reg_images) == (50, 1)
    assert len(group) == 100
    ex = group[0]
    assert ex["images"].shape == (1, 3, 64, 64)
    assert ex["captions"][0] in ("Pokemon butterfly", "butterfly")


def _single_subset_config(image_dir, *subset_lines):
    """The README's config for methods 2 and 3: no buckets, 64 px, batch 1, one random-crop subset of
    ``image_dir`` with the method's own ``subset_lines``."""
    return f"""
[general]
enable_bucket = false
[[datasets]]
resolution = 64
batch_size = 1
  [[datasets.subsets]]
  random_crop = true
  image_dir = '{image_dir}'
""" + "".join(f"  {line}\n" for line in subset_lines)


def test_readme_method_2_caption_files(tmp_path):
    d, reg = _butterflies(tmp_path, captions=True)
    group = build_group(tmp_path, _single_subset_config(d, "caption_extension = '.txt'", "num_repeats = 10"))
    caps = sorted(info.caption for info in group.image_data.values())
    assert caps == [f"a picture of butterfly {i}" for i in range(711, 716)]


def test_readme_method_3_fine_tuning(tmp_path):
    d = tmp_path / "data_path" / "pokemon_blip" / "train"
    for i in range(3):
        write_image(str(d / f"img{i}.png"), 64, 64, seed=i)
    meta = write_text(str(tmp_path / "data_path" / "metadata.json"),
                      json.dumps({f"img{i}": {"caption": f"pokemon {i}"} for i in range(3)}))
    group = build_group(tmp_path, _single_subset_config(d, f"metadata_file = '{meta}'"))
    assert sorted(info.caption for info in group.image_data.values()) == ["pokemon 0", "pokemon 1", "pokemon 2"]
    assert len(group) == 3
