"""The fine-tuning ``metadata.json`` that kohya's ``finetune/`` scripts write and the fine-tuning dataset
(``library/dataset_finetuning.py``) reads: ``{"<image key>": {"caption": ..., "tags": ...}, ...}``.

The image key is the file name without its extension (the dataset looks for ``<key><ext>`` in
``image_dir``), or with ``--full_path`` the image's path. kohya writes that path as it found it under
``train_data_dir`` (relative when the folder was given relative, which kohya's dataset then resolves
from the working directory); here it is absolute, which the dataset reads wherever it runs. For an
absolute ``train_data_dir`` the two are the same.

The file is written as kohya writes it (``json.dumps(metadata, indent=2)``: ASCII with ``\\uXXXX``
escapes, entries in insertion order: those of the input file first, then new images in path order),
to a temporary file renamed at the end.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import List, Optional

from library.device_utils import UserError
from library.image_utils import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

MAX_LISTED = 3


def glob_images_pathlib(dir_path: Path, recursive: bool) -> List[Path]:
    """kohya's image search: kohya's extensions (case as listed) directly in ``dir_path``, or in every
    folder below it with ``recursive``; sorted, without duplicates."""
    paths = set()
    for ext in IMAGE_EXTENSIONS:
        paths.update(dir_path.rglob("*" + ext) if recursive else dir_path.glob("*" + ext))
    return sorted(p for p in paths if p.is_file())


def check_input_folder(folder: str, label: str):
    if not os.path.isdir(folder):
        raise UserError(f"{label} {folder}: not a folder" if os.path.exists(folder)
                        else f"{label} {folder}: folder not found")


def check_output_file(path: str, label: str):
    """Before any work: ``path`` can be written (its folder exists and is writable, it is not a folder)."""
    from library.path_utils import check_writable_folder

    if os.path.isdir(path):
        raise UserError(f"{label} {path}: is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{label} {path}: its folder {folder} does not exist")
    check_writable_folder(folder, label)


def read_metadata(path: str) -> dict:
    """A metadata file as the dataset reads it (``.json``, or kohya's ``.jsonl``); one-line errors."""
    from library.dataset_finetuning import load_metadata

    return load_metadata(path)


def write_metadata(path: str, metadata: dict):
    from library.path_utils import atomic_write_text

    atomic_write_text(path, json.dumps(metadata, indent=2))


def read_text_file(path: Path, what: str) -> str:
    """kohya reads captions and tags as UTF-8 and strips surrounding white space."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None


def merge_text_files(train_data_dir: str, out_json: str, in_json: Optional[str], extension: str, field: str,
                     full_path: bool = False, recursive: bool = False, debug: bool = False) -> dict:
    """kohya's ``merge_captions_to_metadata`` / ``merge_dd_tags_to_metadata``: for every image of
    ``train_data_dir``, the text of ``<image stem><extension>`` as the entry's ``field`` ("caption" or
    "tags"), merged into ``in_json`` (default: ``out_json`` when it exists); writes ``out_json``."""
    from tqdm import tqdm

    what = "caption" if field == "caption" else "tag"
    if recursive and not full_path:
        raise UserError("--recursive requires --full_path (keys without folders would collide)")
    if not extension.startswith(".") or len(extension) < 2 or "/" in extension:
        raise UserError(f"--caption_extension {extension!r}: must be an extension with its dot, like .txt")
    check_input_folder(train_data_dir, "train_data_dir")
    check_output_file(out_json, "out_json")
    if in_json is None and os.path.isfile(out_json):
        in_json = out_json
    if in_json is not None:
        logger.info(f"loading existing metadata: {in_json}")
        metadata = read_metadata(in_json)
        logger.warning(f"{field} of images already in the metadata will be overwritten")
    else:
        logger.info("new metadata will be created")
        metadata = {}

    image_paths = glob_images_pathlib(Path(os.path.abspath(train_data_dir)), recursive)
    logger.info(f"found {len(image_paths)} images.")
    missing = [str(p.with_suffix(extension)) for p in image_paths if not p.with_suffix(extension).is_file()]
    if missing:
        more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise UserError(f"{len(missing)} {what} file(s) not found: {', '.join(missing[:MAX_LISTED])}{more} "
                        f"(--caption_extension {extension})")
    for image_path in tqdm(image_paths, desc=f"merging {what}s", unit="img", dynamic_ncols=True):
        text = read_text_file(image_path.with_suffix(extension), what)
        image_key = str(image_path) if full_path else image_path.stem
        entry = metadata.setdefault(image_key, {})
        entry[field] = text
        if debug:
            logger.info(f"{image_key} {text}")
    logger.info(f"writing metadata: {out_json}")
    write_metadata(out_json, metadata)
    print(f"wrote {out_json}: {len(image_paths)} {what}(s) merged, {len(metadata)} entries")
    return metadata
