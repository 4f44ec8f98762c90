"""Convert a Hugging Face ``datasets`` dataset into kohya's fine-tuning layout:
one image file per row plus a ``metadata.json`` with the captions.

    python tools/convert_hf_dataset.py --dataset_name path/to/dataset --save_folder data/pokemon

Output (images and metadata in the same folder)::

    <save_folder>/img0.png, img1.png, ...
    <save_folder>/metadata.json     {"img0": {"caption": "..."}, "img1": {...}, ...}

Keys are the file names without extension, relative to ``image_dir``, as
kohya's ``merge_captions_to_metadata.py`` writes them, so the folder is used
directly in a dataset config (``--train_data_dir`` / ``--in_json`` work too)::

    [[datasets.subsets]]
    image_dir = '<save_folder>'
    metadata_file = '<save_folder>/metadata.json'

Inputs (--dataset_name):
  * a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
  * a ``.parquet`` or ``.arrow`` file, or a glob of them (quote it);
  * a folder ``datasets.load_dataset`` understands: parquet/arrow files, an
    imagefolder (images + ``metadata.jsonl``/``metadata.csv``), a local clone
    of a hub dataset repository;
  * a hub name (``owner/name``): read from the Hugging Face cache (--cache_dir)
    when it is there; downloaded only with --allow_download.

Offline by default: HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 are set unless
--allow_download is given, so nothing is fetched from the network.

Columns: the image column is the dataset's one ``Image`` feature, the caption
column the one string column named caption/captions/text/prompt/...; pass
--image_column/--caption_column when that is ambiguous (the error lists the
columns). A caption column holding a list of strings is written as one
caption per line (kohya's ``enable_wildcard`` picks one line per step).

Images: --image_format png (default) decodes each image and writes a PNG,
pixel for pixel (modes PNG cannot hold, e.g. CMYK, are converted to RGB/RGBA);
--image_format original writes the stored bytes unchanged when they are PNG,
JPEG, WebP or BMP (kohya's formats, extension from the decoded format; faster,
no re-encoding) and a PNG otherwise. Either way each image is decoded once,
so a corrupt image stops the run with its row number.

Resumable: images that already exist are skipped; each image is written to
``<name>.partial`` and renamed when complete, so an image cut off by a killed
run is never taken as done (leftover ``.partial`` files are removed at the
start). ``metadata.json`` (all rows) is written to a temporary file and
renamed at the end. The folder remembers its source in
``.convert_hf_dataset.json``; converting a different dataset, split, image
column or image format into it, or into a non-empty folder this tool did not
write, is refused unless --overwrite is given, which first deletes this tool's
earlier output there (``img<N>.<ext>``, ``metadata.json``; other files are kept).

Needs the ``datasets`` package (tested with datasets==5.0.0, the newest that
accepts huggingface-hub<1.0, with pyarrow==25.0.1: pyarrow 26 needs numpy>=2).
"""
import glob
import io
import json
import logging
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (project runtime env; keeps the script pattern of tools/)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402
from library.path_utils import make_output_folder  # noqa: E402

logger = logging.getLogger(__name__)

METADATA_NAME = "metadata.json"
STATE_NAME = ".convert_hf_dataset.json"
PARTIAL_SUFFIX = ".partial"
IMAGE_PREFIX = "img"
DATASETS_PIN = "datasets==5.0.0"

# Caption columns recognised by name (case-insensitive) when --caption_column is not given.
CAPTION_NAMES = ("caption", "captions", "text", "texts", "prompt", "prompts", "description",
                 "blip_caption", "blip2_caption", "sentence")
# Formats kept as stored with --image_format original (PIL format -> extension kohya globs for).
ORIGINAL_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}
# Modes PIL writes to PNG as they are; others are converted.
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")
SINGLE_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--dataset_name", required=True,
                   help="local dataset (save_to_disk folder, parquet/arrow file or glob, folder for "
                        "datasets.load_dataset, e.g. an imagefolder) or a hub name owner/name")
    p.add_argument("--save_folder", required=True, help="output folder for the images and metadata.json")
    p.add_argument("--split", default=None,
                   help="split to convert (default: 'train' when the dataset has it, else its only split)")
    p.add_argument("--image_column", default=None, help="image column (default: the one Image feature)")
    p.add_argument("--caption_column", default=None,
                   help=f"caption column (default: the one string column named one of {', '.join(CAPTION_NAMES)})")
    p.add_argument("--config_name", default=None, help="dataset configuration name (datasets.load_dataset 'name')")
    p.add_argument("--cache_dir", default=None,
                   help="datasets cache folder for load_dataset (default: the Hugging Face cache); "
                        "not used for save_to_disk folders, which are read in place")
    p.add_argument("--allow_download", action="store_true",
                   help="allow network access to the Hugging Face hub (default: offline, "
                        "HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1)")
    p.add_argument("--image_format", default="png", choices=("png", "original"),
                   help="png: decode and write PNG (default); original: keep the stored PNG/JPEG/WebP/BMP bytes")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete this tool's earlier output in --save_folder (img<N>.<ext>, "
                        "metadata.json; other files are kept) and convert into it")
    return p.parse_args(argv)


def set_offline(allow_download: bool):
    """Offline mode for datasets/huggingface_hub; must run before they are imported to take full effect."""
    value = "0" if allow_download else "1"
    os.environ["HF_DATASETS_OFFLINE"] = value
    os.environ["HF_HUB_OFFLINE"] = value
    # Already imported (e.g. called in-process): their module-level flags were read at import.
    for module, attr in (("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"),
                         ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        if module in sys.modules:
            setattr(sys.modules[module], attr, not allow_download)


def import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"the 'datasets' package is required: pip install {DATASETS_PIN} ({e})") from e
    return datasets


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------------- loading

def is_save_to_disk_folder(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_dict.json"))
                                    or os.path.isfile(os.path.join(path, "state.json")))


def load_source(args):
    """Returns (dataset or DatasetDict, source identity string, whether --split was applied by the loader)."""
    datasets = import_datasets()
    name = args.dataset_name
    kwargs = {}
    if args.config_name is not None:
        kwargs["name"] = args.config_name
    if args.cache_dir is not None:
        kwargs["cache_dir"] = args.cache_dir
    if args.split is not None:
        kwargs["split"] = args.split

    if is_save_to_disk_folder(name):
        if args.config_name is not None:
            raise UserError(f"--config_name does not apply to a save_to_disk folder: {name}")
        if args.cache_dir is not None:
            logger.warning("--cache_dir is not used: a save_to_disk folder is read in place")
        try:
            return datasets.load_from_disk(name), os.path.realpath(name), False
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read dataset folder {name}: {one_line(e)}") from e

    if os.path.isfile(name) or any(c in name for c in "*?["):
        files = [name] if os.path.isfile(name) else sorted(glob.glob(name))
        if not files:
            raise UserError(f"dataset path not found: {name} (no file matches)")
        exts = {os.path.splitext(f)[1].lower() for f in files}
        if len(exts) != 1 or next(iter(exts)) not in SINGLE_FILE_BUILDERS:
            raise UserError(f"unsupported dataset file type {', '.join(sorted(exts))} for {name}: give .parquet or "
                            f".arrow files, a dataset folder or a hub name")
        builder = SINGLE_FILE_BUILDERS[next(iter(exts))]
        source = ",".join(os.path.realpath(f) for f in files)
        try:
            return datasets.load_dataset(builder, data_files=files, **kwargs), source, "split" in kwargs
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {name}: {one_line(e)}") from e

    if os.path.isdir(name):
        try:
            return datasets.load_dataset(name, **kwargs), os.path.realpath(name), "split" in kwargs
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read dataset folder {name}: {one_line(e)}") from e

    looks_like_hub_name = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None
    if not looks_like_hub_name:
        raise UserError(f"dataset path not found: {name}")
    try:
        return datasets.load_dataset(name, **kwargs), name, "split" in kwargs
    except (OSError, ValueError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1"
        if offline and isinstance(e, (ConnectionError, FileNotFoundError)):
            where = f" (cache {args.cache_dir})" if args.cache_dir else ""
            raise UserError(f"dataset not found: '{name}' is not a local path and not in the Hugging Face "
                            f"cache{where}; pass --allow_download to fetch it from the hub") from e
        raise UserError(f"cannot load dataset '{name}': {one_line(e)}") from e


def select_split(loaded, split, split_applied):
    """The Dataset to convert and the split's name."""
    datasets = import_datasets()
    if isinstance(loaded, datasets.Dataset):
        own = str(loaded.split) if loaded.split is not None else None
        if split is not None and not split_applied and own is not None and own != split:
            raise UserError(f"--split {split}: the dataset holds only split '{own}'")
        if split is not None and not split_applied and own is None:
            logger.warning(f"--split {split}: the dataset has no splits (a single saved Dataset); converting it")
        return loaded, split if split is not None else own
    splits = list(loaded.keys())
    if split is not None:
        if split not in loaded:
            raise UserError(f"unknown split '{split}': the dataset has {', '.join(splits) or 'no splits'}")
        return loaded[split], split
    if "train" in loaded:
        return loaded["train"], "train"
    if len(splits) == 1:
        return loaded[splits[0]], splits[0]
    raise UserError(f"the dataset has several splits ({', '.join(splits)}): choose one with --split")


# ---------------------------------------------------------------------------------------------- columns

def is_string_feature(feature) -> bool:
    datasets = import_datasets()
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def is_string_list_feature(feature) -> bool:
    if isinstance(feature, (list, tuple)) and len(feature) == 1:
        return is_string_feature(feature[0])
    inner = getattr(feature, "feature", None)
    return inner is not None and is_string_feature(inner)


def describe_feature(feature) -> str:
    datasets = import_datasets()
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, (list, tuple)) and len(feature) == 1:
        return f"list of {describe_feature(feature[0])}"
    inner = getattr(feature, "feature", None)
    if inner is not None and not isinstance(feature, dict):
        return f"list of {describe_feature(inner)}"
    return type(feature).__name__


def describe_columns(features) -> str:
    return ", ".join(f"{k} ({describe_feature(v)})" for k, v in features.items())


def pick_columns(dataset, image_column, caption_column):
    datasets = import_datasets()
    features = dataset.features
    columns = describe_columns(features)
    if image_column is None:
        candidates = [k for k, v in features.items() if isinstance(v, datasets.Image)]
        if len(candidates) != 1:
            what = "no Image column" if not candidates else f"several Image columns ({', '.join(candidates)})"
            raise UserError(f"{what}: choose one with --image_column; columns: {columns}")
        image_column = candidates[0]
    elif image_column not in features:
        raise UserError(f"unknown --image_column '{image_column}'; columns: {columns}")
    elif not isinstance(features[image_column], datasets.Image):
        raise UserError(f"--image_column '{image_column}' is not an Image feature; columns: {columns}")

    if caption_column is None:
        candidates = [k for k, v in features.items() if k.lower() in CAPTION_NAMES
                      and (is_string_feature(v) or is_string_list_feature(v))]
        if len(candidates) != 1:
            what = ("no caption column" if not candidates
                    else f"several caption columns ({', '.join(candidates)})")
            raise UserError(f"{what}: choose one with --caption_column; columns: {columns}")
        caption_column = candidates[0]
    elif caption_column not in features:
        raise UserError(f"unknown --caption_column '{caption_column}'; columns: {columns}")
    elif not (is_string_feature(features[caption_column]) or is_string_list_feature(features[caption_column])):
        raise UserError(f"--caption_column '{caption_column}' is not a string column; columns: {columns}")
    return image_column, caption_column


def caption_text(value, row):
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise UserError(f"row {row}: caption is not text: {value!r:.80}")


# ---------------------------------------------------------------------------------------------- output

def check_save_folder(save_folder, state, overwrite):
    """Create the folder and refuse to mix conversions; --overwrite first removes this tool's earlier output."""
    make_output_folder(save_folder, "--save_folder")
    state_path = os.path.join(save_folder, STATE_NAME)
    previous = None
    if os.path.isfile(state_path):
        try:
            with open(state_path, "rt", encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
    if overwrite:
        remove_outputs(save_folder)
    elif previous is not None and previous != state:
        diff = ", ".join(f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in state.items() if previous.get(k) != v)
        raise UserError(f"{save_folder} holds another conversion ({diff}); use a new folder or --overwrite")
    elif previous is None:
        others = [n for n in os.listdir(save_folder) if not n.endswith(PARTIAL_SUFFIX)]
        if others:
            raise UserError(f"{save_folder} is not empty and was not written by this tool; use an empty folder or "
                            f"--overwrite")
    if previous != state or overwrite:
        write_atomic(state_path, (json.dumps(state, indent=2) + "\n").encode("utf-8"), what="file")


def remove_outputs(save_folder):
    """Delete what this tool writes (img<N>.<ext>, metadata.json); other files are left alone."""
    pattern = re.compile(re.escape(IMAGE_PREFIX) + r"\d+(" + "|".join(re.escape(e) for e in IMAGE_EXTS) + ")")
    for name in os.listdir(save_folder):
        if pattern.fullmatch(name) or name == METADATA_NAME:
            try:
                os.remove(os.path.join(save_folder, name))
            except OSError as e:
                raise UserError(f"cannot remove {os.path.join(save_folder, name)}: {one_line(e)}") from e


def remove_partials(save_folder):
    for name in os.listdir(save_folder):
        if name.endswith(PARTIAL_SUFFIX):
            try:
                os.remove(os.path.join(save_folder, name))
            except OSError:
                pass


def write_atomic(path, data: bytes, what="file", fsync=True):
    tmp = path + PARTIAL_SUFFIX
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise UserError(f"cannot write {what} {path}: {one_line(e)}") from e


def existing_image(save_folder, key):
    for ext in IMAGE_EXTS:
        if os.path.isfile(os.path.join(save_folder, key + ext)):
            return key + ext
    return None


def encode_image(value, row, image_format):
    """(file bytes, extension) of one row's image; UserError when it is missing or unreadable."""
    from PIL import Image

    if value is None or (value.get("bytes") is None and not value.get("path")):
        raise UserError(f"row {row}: no image")
    data = value.get("bytes")
    if data is None:
        path = value["path"]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"row {row}: cannot read image file {path}: {one_line(e)}") from e
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for corrupt or truncated data
        raise UserError(f"row {row}: image is not readable ({one_line(e)})") from e
    if image_format == "original" and img.format in ORIGINAL_FORMATS:
        return data, ORIGINAL_FORMATS[img.format]
    if img.mode not in PNG_MODES:
        img = img.convert("RGBA" if "A" in img.getbands() or "a" in img.mode else "RGB")
    out = io.BytesIO()
    params = {}
    if img.info.get("icc_profile"):
        params["icc_profile"] = img.info["icc_profile"]
    if "transparency" in img.info and img.mode in ("P", "L", "RGB", "1"):
        params["transparency"] = img.info["transparency"]
    img.save(out, format="PNG", **params)
    return out.getvalue(), ".png"


def convert(args):
    set_offline(args.allow_download)
    datasets = import_datasets()
    from tqdm import tqdm

    loaded, source, split_applied = load_source(args)
    dataset, split = select_split(loaded, args.split, split_applied)
    image_column, caption_column = pick_columns(dataset, args.image_column, args.caption_column)
    save_folder = args.save_folder
    state = {"source": source, "split": split, "config_name": args.config_name, "image_column": image_column,
             "image_format": args.image_format, "num_rows": len(dataset)}
    check_save_folder(save_folder, state, args.overwrite)
    remove_partials(save_folder)
    logger.info(f"converting {source}" + (f" split {split}" if split else "") + f": {len(dataset)} rows, "
                f"image column '{image_column}', caption column '{caption_column}' -> {save_folder}")

    captions = list(dataset[caption_column])  # one column read; the images are read only where needed
    images = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    metadata = {}
    written = skipped = 0
    with tqdm(total=len(dataset), desc="images", unit="img") as bar:
        for row in range(len(dataset)):
            key = f"{IMAGE_PREFIX}{row}"
            metadata[key] = {"caption": caption_text(captions[row], row)}
            if existing_image(save_folder, key) is not None:
                skipped += 1
            else:
                data, ext = encode_image(images[row][image_column], row, args.image_format)
                write_atomic(os.path.join(save_folder, key + ext), data, what="image", fsync=False)
                written += 1
            bar.update(1)
            bar.set_postfix(written=written, skipped=skipped, refresh=False)

    metadata_path = os.path.join(save_folder, METADATA_NAME)
    write_atomic(metadata_path, json.dumps(metadata, ensure_ascii=False, indent=2).encode("utf-8"),
                 what="metadata file")
    print(f"{written} images written, {skipped} already present; {len(metadata)} captions in {metadata_path}")
    print("dataset config:\n  [[datasets.subsets]]\n"
          f"  image_dir = '{os.path.abspath(save_folder)}'\n  metadata_file = '{os.path.abspath(metadata_path)}'")
    return {"written": written, "skipped": skipped, "metadata": metadata_path}


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return convert(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
