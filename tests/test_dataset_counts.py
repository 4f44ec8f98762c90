"""Regularization balancing, repeats and steps per epoch as kohya computes them."""
import random

from dataset_helpers import build_group, dataset_toml, parse_args, write_image
from library import config_util, train_util


def _images(folder, n, size=(64, 64), start=0):
    for i in range(n):
        write_image(str(folder / f"{start + i:02d}.png"), *size, seed=start + i)


def _repeats(ds):
    return {k.split("/")[-2] + "/" + k.split("/")[-1]: info.num_repeats for k, info in ds.image_data.items()}


def test_reg_cycles_up_to_train_count(tmp_path):
    # train 3 x 5 = 15; one reg image: registered once, then +1 repeat per pass until 15
    _images(tmp_path / "img" / "5_sks dog", 3)
    _images(tmp_path / "reg" / "1_dog", 1)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--reg_data_dir", tmp_path / "reg",
                       "--resolution", "64"])
    random.seed(0)
    group, _ = config_util.build_dataset_groups(args)
    ds = group.datasets[0]
    assert (group.num_train_images, group.num_reg_images) == (15, 1)
    assert _repeats(ds)["1_dog/00.png"] == 15
    assert len(group) == 30
    assert train_util.num_update_steps_per_epoch(len(group), 1) == 30


def test_extra_reg_images_unused(tmp_path):
    # train 2 x 1 = 2; reg 5 x 1 = 5: the first pass stops after two reg images
    _images(tmp_path / "t", 2)
    _images(tmp_path / "r", 5, start=10)
    group = build_group(tmp_path, dataset_toml(
        dict(subsets=[dict(image_dir=tmp_path / "t", class_tokens="sks"),
                      dict(image_dir=tmp_path / "r", class_tokens="dog", is_reg=True)]), resolution=64))
    ds = group.datasets[0]
    assert (group.num_train_images, group.num_reg_images) == (2, 5)
    assert sorted(_repeats(ds).items()) == [("r/10.png", 1), ("r/11.png", 1), ("t/00.png", 1), ("t/01.png", 1)]
    assert len(group) == 4


def test_reg_repeats_round_robin_and_batches(tmp_path):
    # train 2 x 3 = 6; reg 2 x 2 = 4: pass 1 -> n=4, pass 2 adds one repeat each -> 3 + 3
    _images(tmp_path / "t", 2)
    _images(tmp_path / "r", 2, start=10)
    group = build_group(tmp_path, dataset_toml(dict(
        resolution=64, batch_size=4,
        subsets=[dict(image_dir=tmp_path / "t", num_repeats=3, class_tokens="sks"),
                 dict(image_dir=tmp_path / "r", num_repeats=2, class_tokens="dog", is_reg=True)])),
        "--prior_loss_weight", "0.5")
    ds = group.datasets[0]
    assert _repeats(ds) == {"t/00.png": 3, "t/01.png": 3, "r/10.png": 3, "r/11.png": 3}
    assert len(group) == 3  # ceil(12 / 4)
    weights = sorted(w for i in range(len(group)) for w in group[i]["loss_weights"].tolist())
    assert weights == [0.5] * 6 + [1.0] * 6
    # kohya: --max_train_epochs 2 with gradient accumulation 2 -> 2 * ceil(3 / 1 / 2) = 4 steps
    assert train_util.max_train_steps_for_epochs(2, len(group), 1, 2) == 4
    assert train_util.num_train_epochs(10, len(group), 2) == 5


def test_buckets_batches_and_multiple_datasets(tmp_path):
    # dataset 1: bucket (64,64) 3 samples, bucket (96,32)... 2 samples; batch 2 -> 2 + 1 batches
    _images(tmp_path / "a", 3, (64, 64))
    _images(tmp_path / "b", 1, (96, 32), start=20)
    _images(tmp_path / "c", 4, (64, 64), start=30)
    group = build_group(tmp_path, dataset_toml(
        dict(resolution=64, batch_size=2,
             subsets=[dict(image_dir=tmp_path / "a"), dict(image_dir=tmp_path / "b", num_repeats=2)]),
        dict(resolution=64, batch_size=3, subsets=[dict(image_dir=tmp_path / "c", num_repeats=2)]),
        enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, class_tokens="x"))
    d1, d2 = group.datasets
    assert [len(b) for b in d1.bucket_manager.buckets] == [3, 2]
    assert len(d1) == 2 + 1
    assert len(d2) == 3  # ceil(8 / 3)
    assert len(group) == 6
    assert group.num_train_images == 3 + 2 + 8
    shapes = sorted(group[i]["images"].shape for i in range(len(group)))
    assert shapes == [(1, 3, 64, 64), (2, 3, 32, 96), (2, 3, 64, 64), (2, 3, 64, 64), (3, 3, 64, 64),
                      (3, 3, 64, 64)]


def test_zero_repeats_subset_ignored(tmp_path):
    _images(tmp_path / "img" / "0_skip", 2)
    _images(tmp_path / "img" / "2_keep", 1, start=5)
    (tmp_path / "img" / "no_repeats").mkdir()
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64"])
    random.seed(0)
    group, _ = config_util.build_dataset_groups(args)
    assert group.num_train_images == 2 and len(group) == 2


def test_subsets_without_repeats_or_given_twice_are_skipped_with_a_warning(tmp_path, caplog):
    """kohya: a subset with num_repeats 0, or the same image_dir / metadata_file a second time, is left out
    with a warning (the first one counts), in both dataset methods."""
    import json

    _images(tmp_path / "a", 2)
    _images(tmp_path / "b", 3, start=10)
    (tmp_path / "meta.json").write_text(json.dumps({"10": {"caption": "x"}, "11": {"caption": "y"}}))
    with caplog.at_level("WARNING"):
        dreambooth = build_group(tmp_path, dataset_toml(dict(resolution=64, subsets=[
            dict(image_dir=tmp_path / "a", class_tokens="sks", num_repeats=2),
            dict(image_dir=tmp_path / "a", class_tokens="other"),
            dict(image_dir=tmp_path / "b", class_tokens="zero", num_repeats=0)])))
        meta = dict(image_dir=tmp_path / "b", metadata_file=tmp_path / "meta.json")
        fine_tuning = build_group(tmp_path, dataset_toml(dict(resolution=64, subsets=[
            meta, dict(meta, num_repeats=3)])))
    assert dreambooth.num_train_images == 4 and len(dreambooth.datasets[0].subsets) == 1
    assert fine_tuning.num_train_images == 2 and len(fine_tuning.datasets[0].subsets) == 1
    for source in (f"image_dir='{tmp_path / 'a'}'", f"metadata_file='{tmp_path / 'meta.json'}'"):
        assert f"ignore duplicated subset with {source}: use the first one" in caplog.text
    assert f"ignore subset with image_dir='{tmp_path / 'b'}': num_repeats is less than 1: 0" in caplog.text
