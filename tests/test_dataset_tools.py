"""The dataset tools run between trainings: finetune/merge_captions_to_metadata.py,
finetune/merge_dd_tags_to_metadata.py, finetune/clean_captions_and_tags.py,
tools/resize_images_to_resolution.py, tools/cache_latents.py and tools/cache_text_encoder_outputs.py.

Real image and caption files in tmp_path; the expected JSON is written out from kohya's source (its
json.dumps(indent=2), key order, cleaning rules); the fine-tuning dataset loads what the tools
write; resized sizes follow kohya's arithmetic; the cache tools fill the caches that the trainer's own
caching code then finds valid (it encodes nothing). A real training run on tool-made caches is in
test_train_te_cache.py. User errors end in one line, exit status 2 and no output."""
import json
import os
import random
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from dataset_helpers import write_image, write_text
from library.device_utils import run_main

for folder in ("finetune", "tools"):
    sys.path.insert(0, os.path.join(ROOT, folder))
import cache_latents  # noqa: E402
import cache_text_encoder_outputs  # noqa: E402
import clean_captions_and_tags  # noqa: E402
import merge_captions_to_metadata  # noqa: E402
import merge_dd_tags_to_metadata  # noqa: E402
import resize_images_to_resolution  # noqa: E402


def _kohya_json(metadata):
    """What kohya's scripts write: json.dumps(metadata, indent=2) (ASCII, \\u escapes)."""
    return json.dumps(metadata, indent=2)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _one_line_error(main, argv, capsys, *expected):
    """``main(argv)`` run as the script runs it: exit status 2, the error is one line naming ``expected``."""
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: main([str(a) for a in argv]))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    for text in expected:
        assert str(text) in err[0], err[0]
    return err[0]


# -- finetune/ -----------------------------------------------------------------------------------

@pytest.fixture
def captioned(tmp_path):
    img = tmp_path / "img"
    write_image(str(img / "b.png"), 80, 64, seed=1)
    write_image(str(img / "a.jpg"), 64, 96, seed=2, fmt="JPEG")
    write_image(str(img / "sub" / "c.png"), 64, 64, seed=3)
    write_text(str(img / "b.caption"), "  a cartoon anime drawing of a young woman\n")
    write_text(str(img / "a.caption"), "café ☕ people")
    write_text(str(img / "sub" / "c.caption"), "c")
    write_text(str(img / "b.txt"), "1girl, long_hair, blonde_hair, white_shirt, shirt, ^_^, rating:safe")
    write_text(str(img / "a.txt"), "2girls, long_hair, blonde_hair, black_hair, blue_eyes, red_eyes, smile")
    write_text(str(img / "sub" / "c.txt"), "solo, hat, dress, black_dress")
    write_text(str(img / "notes.md"), "not an image")
    return img


def test_merge_and_clean_metadata_as_kohya_writes_it(captioned, tmp_path):
    img = captioned
    cap, dd, clean = tmp_path / "meta_cap.json", tmp_path / "meta_cap_dd.json", tmp_path / "meta_clean.json"

    merge_captions_to_metadata.main([str(img), str(cap)])
    # kohya: images of the folder only (not sub/), sorted by path, keyed by stem, caption stripped
    expected = {"a": {"caption": "café ☕ people"}, "b": {"caption": "a cartoon anime drawing of a young woman"}}
    assert _read(cap) == _kohya_json(expected)
    assert list(json.loads(_read(cap))) == ["a", "b"]

    merge_dd_tags_to_metadata.main([str(img), str(dd), "--in_json", str(cap)])
    expected["a"]["tags"] = "2girls, long_hair, blonde_hair, black_hair, blue_eyes, red_eyes, smile"
    expected["b"]["tags"] = "1girl, long_hair, blonde_hair, white_shirt, shirt, ^_^, rating:safe"
    assert _read(dd) == _kohya_json(expected)

    # without --in_json an existing out_json is read and updated: captions replaced, tags kept
    write_text(str(img / "a.caption"), "a lady")
    merge_captions_to_metadata.main([str(img), str(dd)])
    expected["a"]["caption"] = "a lady"
    assert _read(dd) == _kohya_json(expected)

    clean_captions_and_tags.main([str(dd), str(clean)])
    # kohya's rules: "_" -> " " (not in ^_^), DeepDanbooru rating dropped, "shirt" dropped beside
    # "white shirt"; with 2girls the two eye colours and the two hair colours go, the hair length stays;
    # captions: "lady" -> "girl", "a cartoon anime drawing" -> "a drawing", "young " -> ""
    expected = {"a": {"caption": "a girl", "tags": "2girls, long hair, smile"},
                "b": {"caption": "a drawing of a girl", "tags": "1girl, long hair, blonde hair, white shirt, ^_^"}}
    assert _read(clean) == _kohya_json(expected)

    # the fine-tuning dataset reads it: caption + caption_separator + tags
    from library import config_util

    toml = tmp_path / "dataset.toml"
    write_text(str(toml), f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{img}'\n"
                          f"metadata_file = '{clean}'\n")
    group, _ = config_util.build_dataset_groups(_trainer_args(["--dataset_config", toml]))
    captions = {os.path.basename(i.absolute_path): i.caption for i in group.image_data.values()}
    assert captions == {"a.jpg": "a girl,2girls, long hair, smile",
                        "b.png": "a drawing of a girl,1girl, long hair, blonde hair, white shirt, ^_^"}


def test_merge_full_path_recursive_and_clean_legacy_form(captioned, tmp_path):
    img = captioned
    out = tmp_path / "full.json"
    merge_dd_tags_to_metadata.main([str(img), str(out), "--full_path", "--recursive"])
    # keys are the images' paths (absolute: img is), sorted as kohya sorts Path objects
    expected = {str(img / "a.jpg"): {"tags": "2girls, long_hair, blonde_hair, black_hair, blue_eyes, red_eyes, smile"},
                str(img / "b.png"): {"tags": "1girl, long_hair, blonde_hair, white_shirt, shirt, ^_^, rating:safe"},
                str(img / "sub" / "c.png"): {"tags": "solo, hat, dress, black_dress"}}
    assert _read(out) == _kohya_json(expected)

    # kohya's old three-argument form: train_data_dir in_json out_json; in place is fine
    clean_captions_and_tags.main([str(img), str(out), str(out)])
    cleaned = json.loads(_read(out))
    # entries without a caption are logged and kept; "dress" goes beside "black dress"
    assert cleaned[str(img / "sub" / "c.png")] == {"tags": "solo, hat, black dress"}
    assert cleaned[str(img / "a.jpg")] == {"tags": "2girls, long hair, smile"}

    from library import config_util

    toml = tmp_path / "dataset.toml"
    write_text(str(toml), f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{out}'\n")
    group, _ = config_util.build_dataset_groups(_trainer_args(["--dataset_config", toml]))
    assert sorted(group.image_data) == sorted(expected)


def test_clean_rules_with_several_people():
    clean = clean_captions_and_tags.clean_tags
    # every duplicate kind goes with 2girls; "hair ornament" goes beside "star hair ornament"
    assert clean("k", "2girls, long_hair, short_hair, blonde_hair, black_hair, blue_eyes, red_eyes, ponytail, "
                      "twintails, hair_ornament, star_hair_ornament, long_sleeves, sleeveless, smile") == \
        "2girls, star hair ornament, smile"
    # two hair cuts go; "skirt" goes beside "pleated skirt"; all after the first rating is dropped
    assert clean("k", "multiple_boys, bob_cut, hime_cut, skirt, pleated_skirt, rating:questionable, rating:safe") == \
        "multiple boys, pleated skirt"
    # one person: nothing of the several-people rules
    assert clean("k", "1girl, blue_eyes, red_eyes") == "1girl, blue eyes, red eyes"
    assert clean_captions_and_tags.clean_caption("anime girl girl, an anime character, a cartoon image of a person") \
        == "girl, an girl, an image of a girl"


def test_finetune_tools_bad_inputs(captioned, tmp_path, capsys):
    img = captioned
    merge = merge_captions_to_metadata.main
    _one_line_error(merge, [tmp_path / "nope", tmp_path / "m.json"], capsys, "nope", "not found")
    _one_line_error(merge, [img, tmp_path / "no_dir" / "m.json"], capsys, "no_dir", "does not exist")
    _one_line_error(merge, [img, img / "notes.md" / "m.json"], capsys, "notes.md")
    _one_line_error(merge, [img, tmp_path / "m.json", "--recursive"], capsys, "--full_path")
    _one_line_error(merge, [img, tmp_path / "m.json", "--caption_extension", "txt"], capsys, "txt")
    os.remove(img / "b.caption")
    _one_line_error(merge, [img, tmp_path / "m.json"], capsys, "b.caption", "not found")
    write_text(str(tmp_path / "bad.json"), "{not json")
    _one_line_error(merge_dd_tags_to_metadata.main, [img, tmp_path / "m.json", "--in_json", tmp_path / "bad.json"],
                    capsys, "bad.json", "not valid JSON")
    _one_line_error(clean_captions_and_tags.main, [tmp_path / "nope.json", tmp_path / "m.json"], capsys, "nope.json")
    _one_line_error(clean_captions_and_tags.main, [tmp_path / "bad.json", tmp_path / "m.json", "--bogus"], capsys,
                    "--bogus")
    with open(img / "a.caption", "wb") as f:
        f.write(b"\xff\xfe bad")
    os.remove(img / "b.png")
    _one_line_error(merge, [img, tmp_path / "m.json"], capsys, "a.caption", "UTF-8")
    assert not os.path.exists(tmp_path / "m.json")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp_")] == []


# -- tools/resize_images_to_resolution.py -------------------------------------------------------

def test_resize_images_sizes_names_and_copies(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst" / "out"
    write_image(str(src / "wide.png"), 80, 64, seed=1)
    write_image(str(src / "tall.JPG"), 64, 96, seed=2, fmt="JPEG")
    write_image(str(src / "small.png"), 30, 21, seed=3)
    write_text(str(src / "wide.txt"), "a wide image")
    write_text(str(src / "readme.md"), "notes")
    written = resize_images_to_resolution.main([str(src), str(dst), "--max_resolution", "64x48,32x32",
                                                "--divisible_by", "8", "--save_as_png", "--copy_associated_files"])
    # kohya: above W*H pixels, scale by sqrt(W*H/pixels) with int() per side, then crop each side down to
    # a multiple of 8; the second resolution starts from the first one's result
    #   wide 80x64 (5120 > 3072): x0.7746 -> 61x49 -> 56x48; 2688 > 1024: x0.6172 -> 34x29 -> 32x24
    #   tall 64x96 (6144 > 3072): x0.7071 -> 45x67 -> 40x64; 2560 > 1024: x0.6325 -> 25x40 -> 24x40
    #   small 30x21 is not scaled, only cropped: 24x16 both times
    expected = {"wide+64x48.png": (56, 48), "wide+32x32.png": (32, 24), "tall+64x48.png": (40, 64),
                "tall+32x32.png": (24, 40), "small+64x48.png": (24, 16), "small+32x32.png": (24, 16)}
    for name, size in expected.items():
        with Image.open(dst / name) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", size), name
    # other files are copied as they are; a caption follows its image at each resolution
    assert sorted(os.listdir(dst)) == sorted(written) == sorted(
        list(expected) + ["wide.txt", "readme.md", "wide+64x48.txt", "wide+32x32.txt"])
    assert _read(dst / "wide+32x32.txt") == "a wide image"
    # the crop is centred: small+64x48 is the middle 24x16 of the source
    src_small = np.asarray(Image.open(src / "small.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(dst / "small+64x48.png")), src_small[2:18, 3:27])

    # default: JPEG at quality 100, sizes divisible by 1
    resize_images_to_resolution.main([str(src), str(tmp_path / "jpg"), "--max_resolution", "48x48"])
    with Image.open(tmp_path / "jpg" / "wide+48x48.jpg") as im:
        assert im.format == "JPEG" and im.size == (53, 42)  # 80x64 x sqrt(2304/5120) -> 53.66x42.93


def test_resize_images_bad_inputs(tmp_path, capsys):
    main = resize_images_to_resolution.main
    src = tmp_path / "src"
    write_image(str(src / "a.png"), 40, 40)
    _one_line_error(main, [tmp_path / "nope", tmp_path / "out"], capsys, "nope", "not found")
    _one_line_error(main, [src, src / "a.png" / "out"], capsys, "a.png", "is a file")
    _one_line_error(main, [src, tmp_path / "out", "--max_resolution", "512"], capsys, "512", "WIDTHxHEIGHT")
    _one_line_error(main, [src, src], capsys, "source folder")
    _one_line_error(main, [src, tmp_path / "out", "--max_resolution", "2x2", "--divisible_by", "3"], capsys,
                    "a.png", "nothing is left")
    with open(src / "b.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    _one_line_error(main, [src, tmp_path / "out"], capsys, "b.png", "corrupt")
    assert not os.path.exists(tmp_path / "out")  # checked before anything is written


# -- tools/cache_latents.py, tools/cache_text_encoder_outputs.py ---------------------------------

def _trainer_args(argv):
    """The trainer's argument namespace for ``argv`` (its own parser and dataset preparation)."""
    from library import train_util
    from library.train_args import parse_args, setup_parser

    args = parse_args(setup_parser(), [str(a) for a in argv])
    train_util.prepare_dataset_args(args, True)
    return args


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import make_tiny_train_demo as demo

    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    demo.write_checkpoint(path, seed=0, small=True)
    return path


def _cache_dataset(tmp_path):
    img = tmp_path / "img"
    for i, (w, h) in enumerate([(64, 64), (128, 32), (64, 64)]):
        write_image(str(img / f"{i}.png"), w, h, seed=i)
        write_text(str(img / f"{i}.txt"), f"a picture number {i}")
    toml = tmp_path / "dataset.toml"
    write_text(str(toml), "[general]\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
                          "bucket_reso_steps = 32\n[[datasets]]\nresolution = 64\nbatch_size = 2\n"
                          f"[[datasets.subsets]]\nimage_dir = '{img}'\ncaption_extension = '.txt'\nflip_aug = true\n")
    return img, toml


def _stamps(folder):
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder) if n.endswith(".npz")}


def test_cache_tools_fill_the_caches_the_trainer_reads(tiny_checkpoint, tmp_path):
    img, toml = _cache_dataset(tmp_path)
    # the trainer's command line (its training-only arguments are accepted and named in a warning)
    train_argv = ["--pretrained_model_name_or_path", tiny_checkpoint, "--dataset_config", toml, "--seed", 5,
                  "--max_token_length", 150, "--network_module", "networks.lora", "--output_dir", tmp_path / "out"]
    tool_argv = [str(a) for a in train_argv + ["--sdxl", "--pynative", "--vae_batch_size", 2]]

    assert cache_latents.main(tool_argv) == {"images": 3, "computed": 3, "reused": 0}
    assert cache_text_encoder_outputs.main(tool_argv) == {"images": 3, "computed": 3, "reused": 0}
    assert sorted(_stamps(img)) == ["0_0064x0064_sdxl.npz", "0_te_outputs.npz", "1_0128x0032_sdxl.npz",
                                    "1_te_outputs.npz", "2_0064x0064_sdxl.npz", "2_te_outputs.npz"]
    with np.load(img / "1_0128x0032_sdxl.npz") as npz:  # kohya's keys; bucket 128x32 -> latents 4x4x16
        assert {"latents", "latents_flipped", "original_size", "crop_ltrb"} <= set(npz.files)
        assert npz["latents"].shape == npz["latents_flipped"].shape == (4, 4, 16)
        assert npz["original_size"].tolist() == [128, 32]
    with np.load(img / "0_te_outputs.npz") as npz:  # tiny text encoders: hidden 64 and 128, projection 64
        assert npz["hidden_state1"].shape[-1] == 64 and npz["hidden_state2"].shape[-1] == 128
        assert npz["pool2"].shape == (64,)

    # the trainer's own caching code (train_network.py: group.cache_latents / cache_text_encoder_outputs on
    # the datasets it builds from the same command line) finds every file valid and encodes nothing
    from library import config_util, train_util
    from library.clip_tokenizer import load_tokenizers

    def must_not_encode(*_):
        raise AssertionError("the trainer re-encoded a cached input")

    args = _trainer_args(train_argv + ["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk",
                                       "--network_train_unet_only"])
    tokenizers = load_tokenizers()
    random.seed(args.seed)
    group, _ = config_util.build_dataset_groups(args, tokenizers)
    train_util.verify_dataset_args(args, group, None, args.network_train_unet_only)
    group.cache_latents(must_not_encode, args.vae_batch_size, args.cache_latents_to_disk, args.skip_cache_check)
    group.cache_text_encoder_outputs(must_not_encode, tokenizers, args.max_token_length,
                                     args.cache_text_encoder_outputs_to_disk, skip_cache_check=args.skip_cache_check)
    for i in range(len(group)):
        batch = group[i]
        assert batch["images"] is None and batch["input_ids_list"] is None
        assert batch["latents"].shape[1] == 4 and len(batch["text_encoder_outputs_list"]) == 3

    # resumable: a second run finds everything valid and loads no model
    before = _stamps(img)
    assert cache_latents.main(tool_argv)["computed"] == 0
    assert cache_text_encoder_outputs.main(tool_argv)["computed"] == 0
    # a removed latents file and a changed caption: only those are recomputed
    os.remove(img / "2_0064x0064_sdxl.npz")
    write_text(str(img / "0.txt"), "another caption")
    assert cache_latents.main(tool_argv) == {"images": 3, "computed": 1, "reused": 2}
    assert cache_text_encoder_outputs.main(tool_argv) == {"images": 3, "computed": 1, "reused": 2}
    after = _stamps(img)
    changed = sorted(n for n in after if after[n] != before.get(n))
    assert changed == ["0_te_outputs.npz", "2_0064x0064_sdxl.npz"]


def test_cache_tools_bad_inputs(tiny_checkpoint, tmp_path, capsys):
    img, toml = _cache_dataset(tmp_path)
    base = ["--pretrained_model_name_or_path", tiny_checkpoint, "--dataset_config", toml, "--pynative"]
    for main in (cache_latents.main, cache_text_encoder_outputs.main):
        _one_line_error(main, ["--pretrained_model_name_or_path", tmp_path / "nope.safetensors",
                               "--dataset_config", toml], capsys, "nope.safetensors", "not found")
        _one_line_error(main, ["--pretrained_model_name_or_path", tiny_checkpoint, "--train_data_dir",
                               tmp_path / "no_images"], capsys, "no_images")
        _one_line_error(main, base + ["--flux"], capsys, "--flux")
        _one_line_error(main, base + ["--learning_rat", 1], capsys, "--learning_rate")
    _one_line_error(cache_text_encoder_outputs.main, base + ["--shuffle_caption"], capsys, "shuffle_caption")
    with open(img / "1.png", "wb") as f:  # corrupt: stops before any model is loaded or file written
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    for main in (cache_latents.main, cache_text_encoder_outputs.main):
        _one_line_error(main, base, capsys, "1.png", "cannot read image")
    assert _stamps(img) == {}
    if os.geteuid() != 0:  # root writes into read-only folders: only checkable as another user
        write_image(str(img / "1.png"), 128, 32, seed=1)
        os.chmod(img, 0o555)
        try:
            _one_line_error(cache_latents.main, base, capsys, str(img), "not writable")
        finally:
            os.chmod(img, 0o755)
        assert _stamps(img) == {}
