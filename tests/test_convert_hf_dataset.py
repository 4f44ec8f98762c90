"""tools/convert_hf_dataset.py: a small dataset built here (real PNG/JPEG images
and captions) as a save_to_disk folder, parquet, arrow and an imagefolder is
converted to images + metadata.json; images are pixel-equal, the output loads
as a fine-tuning subset, columns are auto-detected or named, runs resume, and
user errors are one line."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import ROOT

datasets = pytest.importorskip("datasets")
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value  # noqa: E402

from library.device_utils import UserError  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_hf_dataset as conv  # noqa: E402

SCRIPT = os.path.join(ROOT, "tools", "convert_hf_dataset.py")
CAPTIONS = ["a drawing of a green pokemon", "ポケモン with \"quotes\"", "", "a red ball\nsecond line"]


def _images():
    rng = np.random.default_rng(0)
    return [PILImage.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB"),
            PILImage.fromarray(rng.integers(0, 256, (7, 9, 4), dtype=np.uint8), "RGBA"),
            PILImage.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L"),
            PILImage.fromarray(rng.integers(0, 256, (16, 10, 3), dtype=np.uint8), "RGB")]


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


FEATURES = Features({"image": Image(), "text": Value("string"), "label": Value("int64")})


def _dataset(n=4):
    imgs = _images()[:n]
    return Dataset.from_dict({"image": imgs, "text": CAPTIONS[:n], "label": list(range(n))}, features=FEATURES)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    ds = _dataset()
    ds.save_to_disk(str(root / "saved"))
    DatasetDict({"train": ds, "test": _dataset(2)}).save_to_disk(str(root / "saved_dict"))
    ds.to_parquet(str(root / "data.parquet"))
    os.makedirs(root / "parquet_dir" / "data")
    ds.to_parquet(str(root / "parquet_dir" / "data" / "train-00000-of-00001.parquet"))
    arrow = [f for f in os.listdir(root / "saved") if f.endswith(".arrow")]
    assert len(arrow) == 1
    folder = root / "imagefolder" / "train"
    os.makedirs(folder)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, (img, cap) in enumerate(zip(_images(), CAPTIONS)):
            img.save(folder / f"pic_{i}.png")
            f.write(json.dumps({"file_name": f"pic_{i}.png", "text": cap}, ensure_ascii=False) + "\n")
    return {"save_to_disk": root / "saved", "save_to_disk_dict": root / "saved_dict",
            "parquet": root / "data.parquet", "parquet_dir": root / "parquet_dir",
            "arrow": root / "saved" / arrow[0], "imagefolder": root / "imagefolder", "root": root}


@pytest.fixture(autouse=True)
def _restore_offline_flags(monkeypatch):
    """The tool sets the offline env vars and module flags of datasets/huggingface_hub: undo after each test."""
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    for module, attr in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, attr, getattr(module, attr))


def _convert(tmp_path, source, out="out", *extra):
    out = tmp_path / out
    result = conv.main(["--dataset_name", str(source), "--save_folder", str(out),
                        "--cache_dir", str(tmp_path / "hf_cache"), *extra])
    return out, result


def _metadata(out):
    with open(out / "metadata.json", encoding="utf-8") as f:
        return json.load(f)


def _assert_images_equal(out, images, ext=".png"):
    for i, img in enumerate(images):
        written = PILImage.open(out / f"img{i}{ext}")
        assert written.size == img.size and written.mode == img.mode, i
        assert np.array_equal(np.asarray(written), np.asarray(img)), i


@pytest.mark.parametrize("kind", ["save_to_disk", "save_to_disk_dict", "parquet", "parquet_dir", "arrow",
                                  "imagefolder"])
def test_convert_sources(tmp_path, sources, kind):
    out, result = _convert(tmp_path, sources[kind])
    assert result["written"] == 4 and result["skipped"] == 0
    assert _metadata(out) == {f"img{i}": {"caption": c} for i, c in enumerate(CAPTIONS)}
    _assert_images_equal(out, _images())
    assert sorted(os.listdir(out)) == [".convert_hf_dataset.json", "img0.png", "img1.png", "img2.png",
                                       "img3.png", "metadata.json"]


def test_output_is_a_fine_tuning_subset(tmp_path, sources):
    """image_dir + metadata_file as written load in our FineTuningDataset (keys without extension, as kohya)."""
    from dataset_helpers import parse_args, write_toml
    from library import config_util

    out, _ = _convert(tmp_path, sources["save_to_disk"])
    cfg = write_toml(tmp_path / "ds.toml", f"[general]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 64\n"
                                            f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{out}'\n"
                                            f"  metadata_file = '{out / 'metadata.json'}'\n")
    group = config_util.build_dataset_groups(parse_args(["--dataset_config", cfg]))[0]
    got = {os.path.basename(info.absolute_path): info.caption for info in group.image_data.values()}
    assert got == {f"img{i}.png": c for i, c in enumerate(CAPTIONS)}


def test_splits(tmp_path, sources):
    out, result = _convert(tmp_path, sources["save_to_disk_dict"], "test_split", "--split", "test")
    assert result["written"] == 2 and list(_metadata(out)) == ["img0", "img1"]
    with pytest.raises(UserError, match=r"unknown split 'validation': the dataset has train, test"):
        _convert(tmp_path, sources["save_to_disk_dict"], "x", "--split", "validation")
    with pytest.raises(UserError, match=r"Unknown split \"validation\""):
        _convert(tmp_path, sources["parquet"], "x", "--split", "validation")
    two = tmp_path / "two_splits"
    DatasetDict({"a": _dataset(1), "b": _dataset(1)}).save_to_disk(str(two))
    with pytest.raises(UserError, match=r"several splits \(a, b\): choose one with --split"):
        _convert(tmp_path, two, "x")
    out, _ = _convert(tmp_path, two, "b", "--split", "b")
    assert _metadata(out) == {"img0": {"caption": CAPTIONS[0]}}


def test_column_detection(tmp_path):
    imgs = _images()[:2]
    base = {"picture": imgs, "prompt": ["p0", "p1"], "file_name": ["a.png", "b.png"]}
    Dataset.from_dict(base, features=Features({"picture": Image(), "prompt": Value("string"),
                                               "file_name": Value("string")})).save_to_disk(str(tmp_path / "auto"))
    out, _ = _convert(tmp_path, tmp_path / "auto", "auto_out")  # picture + prompt are obvious
    assert _metadata(out) == {"img0": {"caption": "p0"}, "img1": {"caption": "p1"}}
    _assert_images_equal(out, imgs)

    # list-of-strings captions: one caption per line (kohya's enable_wildcard)
    Dataset.from_dict({"image": imgs, "captions": [["a", "b"], ["c"]], "label": [0, 1]},
                      features=Features({"image": Image(), "captions": List(Value("string")),
                                         "label": ClassLabel(names=["x", "y"])})).save_to_disk(str(tmp_path / "lst"))
    out, _ = _convert(tmp_path, tmp_path / "lst", "lst_out")
    assert _metadata(out) == {"img0": {"caption": "a\nb"}, "img1": {"caption": "c"}}

    Dataset.from_dict({"a": imgs, "b": imgs, "caption": ["x", "y"], "text": ["u", "v"], "note": ["n", "m"]},
                      features=Features({"a": Image(), "b": Image(), "caption": Value("string"),
                                         "text": Value("string"), "note": Value("string")})
                      ).save_to_disk(str(tmp_path / "ambiguous"))
    with pytest.raises(UserError, match=r"several Image columns \(a, b\): choose one with --image_column; "
                                        r"columns: a \(Image\), b \(Image\), caption \(string\)"):
        _convert(tmp_path, tmp_path / "ambiguous", "x")
    with pytest.raises(UserError, match=r"several caption columns \(caption, text\): choose one with "
                                        r"--caption_column"):
        _convert(tmp_path, tmp_path / "ambiguous", "x", "--image_column", "b")
    out, _ = _convert(tmp_path, tmp_path / "ambiguous", "named", "--image_column", "b", "--caption_column", "note")
    assert _metadata(out) == {"img0": {"caption": "n"}, "img1": {"caption": "m"}}
    for extra, message in ((("--image_column", "photo"), "unknown --image_column 'photo'; columns: a (Image)"),
                           (("--image_column", "note"), "--image_column 'note' is not an Image feature"),
                           (("--image_column", "a", "--caption_column", "nope"), "unknown --caption_column 'nope'"),
                           (("--image_column", "a", "--caption_column", "b"),
                            "--caption_column 'b' is not a string column")):
        with pytest.raises(UserError) as e:
            _convert(tmp_path, tmp_path / "ambiguous", "x", *extra)
        assert message in str(e.value) and "\n" not in str(e.value)

    Dataset.from_dict({"image": imgs, "name": ["x", "y"]}, features=Features({"image": Image(), "name": Value("string")})
                      ).save_to_disk(str(tmp_path / "nocap"))
    with pytest.raises(UserError, match=r"no caption column: choose one with --caption_column; columns: image "
                                        r"\(Image\), name \(string\)"):
        _convert(tmp_path, tmp_path / "nocap", "x")
    assert not os.path.exists(tmp_path / "x")  # nothing written before the columns are known


def test_original_format_keeps_bytes(tmp_path):
    rng = np.random.default_rng(1)
    jpeg = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(jpeg, format="JPEG", quality=80)
    gif = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).convert("P").save(gif, format="GIF")
    cmyk = io.BytesIO()
    PILImage.new("CMYK", (4, 3), (10, 20, 30, 40)).save(cmyk, format="JPEG")
    rows = [jpeg.getvalue(), _png_bytes(_images()[1]), gif.getvalue(), cmyk.getvalue()]
    Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in rows], "text": list("abcd")},
                      features=Features({"image": Image(), "text": Value("string")})).save_to_disk(str(tmp_path / "ds"))
    out, _ = _convert(tmp_path, tmp_path / "ds", "orig", "--image_format", "original")
    assert sorted(n for n in os.listdir(out) if n.startswith("img")) == ["img0.jpg", "img1.png", "img2.png",
                                                                          "img3.jpg"]
    assert (out / "img0.jpg").read_bytes() == rows[0] and (out / "img1.png").read_bytes() == rows[1]
    assert np.array_equal(np.asarray(PILImage.open(out / "img2.png")), np.asarray(PILImage.open(io.BytesIO(rows[2]))))

    out, _ = _convert(tmp_path, tmp_path / "ds", "png")  # default: PNG, pixel-equal to the decoded image
    for i, data in enumerate(rows):
        src = PILImage.open(io.BytesIO(data))
        written = PILImage.open(out / f"img{i}.png")
        if src.mode == "CMYK":  # PNG cannot hold CMYK: converted as PIL converts it
            src = src.convert("RGB")
        assert written.mode == src.mode and np.array_equal(np.asarray(written), np.asarray(src)), i


def test_resume(tmp_path, sources):
    out, result = _convert(tmp_path, sources["save_to_disk"])
    assert result["written"] == 4
    stamps = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.startswith("img")}

    out, result = _convert(tmp_path, sources["save_to_disk"])  # second run: nothing new
    assert result["written"] == 0 and result["skipped"] == 4
    assert stamps == {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.startswith("img")}

    # a removed image is rewritten; an image cut off by a killed run exists only as <name>.partial
    os.remove(out / "img1.png")
    os.remove(out / "img3.png")
    (out / "img3.png.partial").write_bytes(_png_bytes(_images()[3])[:40])
    (out / "img0.png.partial").write_bytes(b"stale leftover")  # beside a complete image
    (out / "metadata.json.partial").write_bytes(b"{")
    os.remove(out / "metadata.json")
    out, result = _convert(tmp_path, sources["save_to_disk"])
    assert result["written"] == 2 and result["skipped"] == 2
    _assert_images_equal(out, _images())
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    assert _metadata(out) == {f"img{i}": {"caption": c} for i, c in enumerate(CAPTIONS)}
    assert os.stat(out / "img0.png").st_mtime_ns == stamps["img0.png"]


def test_refuses_to_mix_conversions(tmp_path, sources):
    out, _ = _convert(tmp_path, sources["save_to_disk"])
    (out / "notes.txt").write_text("user file")
    with pytest.raises(UserError, match=r"holds another conversion \(source: .* -> .*imagefolder.*, split: None -> "
                                        r"'train'\); use a new folder or --overwrite"):
        _convert(tmp_path, sources["imagefolder"])
    with pytest.raises(UserError, match=r"holds another conversion \(image_format: 'png' -> 'original'\)"):
        _convert(tmp_path, sources["save_to_disk"], "out", "--image_format", "original")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "img0.png").write_bytes(b"not ours")
    with pytest.raises(UserError, match=r"is not empty and was not written by this tool"):
        _convert(tmp_path, sources["save_to_disk"], "foreign")

    # --overwrite starts over: earlier images and metadata go, other files stay
    out, result = _convert(tmp_path, sources["save_to_disk_dict"], "out", "--split", "test", "--overwrite")
    assert result["written"] == 2
    assert sorted(os.listdir(out)) == [".convert_hf_dataset.json", "img0.png", "img1.png", "metadata.json",
                                       "notes.txt"]
    out, result = _convert(tmp_path, sources["save_to_disk"], "foreign", "--overwrite")
    assert result["written"] == 4
    _assert_images_equal(out, _images())


def test_bad_rows_and_offline_hub_name(tmp_path):
    Dataset.from_dict({"image": [{"bytes": _png_bytes(_images()[0]), "path": None},
                                 {"bytes": b"\x89PNG not really", "path": None}], "text": ["ok", "bad"]},
                      features=Features({"image": Image(), "text": Value("string")})).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(UserError, match=r"row 1: image is not readable"):
        _convert(tmp_path, tmp_path / "bad")
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == [".convert_hf_dataset.json", "img0.png"]  # good rows kept, no metadata yet

    with pytest.raises(UserError, match=r"dataset not found: 'someone/no-such-dataset' is not a local path and not "
                                        r"in the Hugging Face cache .*pass --allow_download"):
        _convert(tmp_path, "someone/no-such-dataset", "hub")
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE
    with pytest.raises(UserError, match=r"unsupported dataset file type \.txt"):
        (tmp_path / "notes.txt").write_text("x")
        _convert(tmp_path, tmp_path / "notes.txt", "x")
    with pytest.raises(UserError, match=r"--config_name does not apply to a save_to_disk folder"):
        _convert(tmp_path, tmp_path / "bad", "x", "--config_name", "default")


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_errors_are_one_line(tmp_path, sources):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for args, message in (
            (("--dataset_name", tmp_path / "missing" / "ds", "--save_folder", tmp_path / "o"),
             f"error: dataset path not found: {tmp_path / 'missing' / 'ds'}"),
            (("--dataset_name", sources["save_to_disk"], "--save_folder", blocker / "out"),
             f"error: --save_folder {blocker / 'out'}: cannot create the folder")):
        r = _run(*args)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), r.stderr[-2000:]
    r = _run("--help")
    assert r.returncode == 0 and "--allow_download" in r.stdout and "metadata.json" in r.stdout


def test_offline_unless_allow_download():
    import huggingface_hub.constants

    conv.set_offline(True)
    assert os.environ["HF_DATASETS_OFFLINE"] == "0" and os.environ["HF_HUB_OFFLINE"] == "0"
    assert not datasets.config.HF_HUB_OFFLINE and not huggingface_hub.constants.HF_HUB_OFFLINE
    conv.set_offline(False)
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
