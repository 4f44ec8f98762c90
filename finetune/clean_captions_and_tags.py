"""kohya's ``finetune/clean_captions_and_tags.py``: tidy the captions and tags of a fine-tuning
``metadata.json`` (after ``merge_captions_to_metadata.py`` and ``merge_dd_tags_to_metadata.py``).

    python finetune/clean_captions_and_tags.py meta_cap_dd.json meta_clean.json

Tags (kohya's rules, for Danbooru-style tag lists): underscores become spaces (``^_^`` is kept); a
DeepDanbooru rating (``, rating:...``) and what follows it is dropped; with several people in the
picture (a tag containing ``girls`` or ``boys``), tags that then describe nobody in particular are
dropped when there are two or more of a kind (hair length, hair cut, eye colour, sleeves, hair style;
then hair colours, with the first hair-length tag kept for everyone); a one-word tag (or ``hair
ornament``) is dropped when a longer tag ends with it (``shirt`` beside ``white shirt``).
Captions (BLIP/GIT style): kohya's replacement table, applied in order, each until nothing changes
(``anime woman`` -> ``girl``, ``people`` -> ``girls``, ...).

Entries without tags or caption are logged and kept as they are. Kohya's older three-argument form
(``train_data_dir in_json out_json``) still works, with a warning, as in kohya. The output is written
as kohya writes it (``library/finetune_metadata.py``); ``in_json`` and ``out_json`` may be one file.
"""
import argparse
import logging
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (project runtime env; keeps the script pattern)
from library.arg_utils import ArgumentParser, one_line_errors  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402

logger = logging.getLogger(__name__)

# Tags are matched inside ", tag, , tag, , tag, ": every tag sits between its own two ", " so that
# neighbouring tags can match one after the other.
HAIR_LENGTH = re.compile(r", (long|short|medium) hair, ")
HAIR_CUT = re.compile(r", (bob|hime) cut, ")
ANY_HAIR = re.compile(r", ([\w\-]+) hair, ")
ONE_WORD = re.compile(r", ([\w\-]+|hair ornament), ")
# with several people: two or more of one of these kinds say nothing about anyone, so all go
SEVERAL_PEOPLE_DROP = [
    HAIR_LENGTH,
    HAIR_CUT,
    re.compile(r", [\w\-]+ eyes, "),
    re.compile(r", ([\w\-]+ sleeves|sleeveless), "),
    re.compile(r", (ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up|"
               r"two tails|[\w\-]+ braid|sidelocks), "),
]
HAIR_LENGTH_PLACEHOLDER = ", @@@, "

# (from, to), applied in this order, each until the caption no longer changes
CAPTION_REPLACEMENTS = [
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
]


def clean_tags(image_key: str, tags: str) -> str:
    tags = tags.replace("^_^", "^@@@^").replace("_", " ").replace("^@@@^", "^_^")
    parts = tags.split(", rating")  # DeepDanbooru appends its rating tags last
    if len(parts) > 1:
        if len(parts) > 2:
            logger.info(f"multiple ratings: {image_key} {tags}")
        tags = parts[0]

    tags = ", " + tags.replace(", ", ", , ") + ", "
    if "girls" in tags or "boys" in tags:
        for pattern in SEVERAL_PEOPLE_DROP:
            if len(pattern.findall(tags)) > 1:
                tags = pattern.sub("", tags)
        # one hair-length tag survives (everyone's, when all share it): hidden while hair colours go
        length = HAIR_LENGTH.search(tags)
        if length:
            kept = length.group()
            tags = HAIR_LENGTH.sub(HAIR_LENGTH_PLACEHOLDER, tags)
        if len(ANY_HAIR.findall(tags)) > 1:
            tags = ANY_HAIR.sub("", tags)
        if length:
            tags = tags.replace(HAIR_LENGTH_PLACEHOLDER, kept)

    for word in ONE_WORD.findall(tags):
        if re.search(rf", ((\w+) )+{word}, ", tags):
            tags = tags.replace(f", {word}, ", "")

    tags = tags.replace(", , ", ", ")
    if not (tags.startswith(", ") and tags.endswith(", ")):
        raise UserError(f"{image_key}: tags could not be cleaned (unexpected result {tags!r})")
    return tags[2:-2]


def clean_caption(caption: str) -> str:
    for old, new in CAPTION_REPLACEMENTS:
        while True:
            replaced = caption.replace(old, new)
            if replaced == caption:
                break
            caption = replaced
    return caption


def clean_metadata(metadata: dict, debug: bool = False) -> dict:
    from tqdm import tqdm

    for image_key in tqdm(list(metadata), desc="cleaning", unit="img", dynamic_ncols=True):
        entry = metadata[image_key]
        for field, clean in (("tags", lambda text: clean_tags(image_key, text)), ("caption", clean_caption)):
            text = entry.get(field)
            if text is None:
                logger.error(f"image does not have {field}: {image_key}")
                continue
            if not isinstance(text, str):
                raise UserError(f"{image_key}: '{field}' is not a string ({type(text).__name__})")
            cleaned = clean(text)
            entry[field] = cleaned
            if debug and cleaned != text:
                logger.info("FROM: " + text)
                logger.info("TO:   " + cleaned)
    return metadata


def setup_parser():
    parser = one_line_errors(ArgumentParser(description=__doc__))
    parser.add_argument("in_json", type=str, help="metadata file to input")
    parser.add_argument("out_json", type=str, help="metadata file to output")
    parser.add_argument("legacy_out_json", type=str, nargs="?", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="debug mode: log each change")
    return parser


def main(argv=None):
    from library.finetune_metadata import check_output_file, read_metadata, write_metadata

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = setup_parser().parse_args(argv)
    if args.legacy_out_json is not None:  # kohya's old form: train_data_dir in_json out_json
        logger.warning("the train_data_dir argument is no longer used: pass only in_json and out_json "
                       "(all captions and tags of the metadata are processed)")
        args.in_json, args.out_json = args.out_json, args.legacy_out_json
    check_output_file(args.out_json, "out_json")
    logger.info(f"loading existing metadata: {args.in_json}")
    metadata = clean_metadata(read_metadata(args.in_json), args.debug)
    logger.info(f"writing metadata: {args.out_json}")
    write_metadata(args.out_json, metadata)
    print(f"wrote {args.out_json}: {len(metadata)} entries cleaned")
    return metadata


if __name__ == "__main__":
    run_main(main)
