"""kohya's ``finetune/merge_dd_tags_to_metadata.py``: the tag files of a folder of images (written by a
tagger such as WD14 or DeepDanbooru) into the fine-tuning ``metadata.json``
(``{"<image stem>": {"tags": "..."}}``); the dataset appends an entry's tags to its caption.

    python finetune/merge_dd_tags_to_metadata.py train_data meta_cap_dd.json --in_json meta_cap.json

Each image's tags are ``<image stem><caption_extension>`` (default ``.txt``; UTF-8, stripped). An
existing output (or ``--in_json``) is read first and its entries are kept: tags of images already in
it are replaced, other fields (captions) stay. A missing tag file stops the run before anything is
written. ``--full_path`` and ``--recursive`` as in ``merge_captions_to_metadata.py``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (project runtime env; keeps the script pattern)
from library.arg_utils import ArgumentParser, one_line_errors  # noqa: E402
from library.device_utils import run_main  # noqa: E402


def setup_parser():
    parser = one_line_errors(ArgumentParser(description=__doc__))
    parser.add_argument("train_data_dir", type=str, help="directory for train images")
    parser.add_argument("out_json", type=str, help="metadata file to output")
    parser.add_argument("--in_json", type=str, default=None,
                        help="metadata file to input (if omitted and out_json exists, existing out_json is read)")
    parser.add_argument("--full_path", action="store_true",
                        help="use full path as image-key in metadata (supports multiple directories)")
    parser.add_argument("--recursive", action="store_true",
                        help="recursively look for training tags in all child folders of train_data_dir "
                             "(needs --full_path)")
    parser.add_argument("--caption_extension", type=str, default=".txt", help="extension of caption (tag) file")
    parser.add_argument("--debug", action="store_true", help="debug mode, print tags")
    return parser


def main(argv=None):
    import logging

    from library.finetune_metadata import merge_text_files

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = setup_parser().parse_args(argv)
    return merge_text_files(args.train_data_dir, args.out_json, args.in_json, args.caption_extension, "tags",
                            args.full_path, args.recursive, args.debug)


if __name__ == "__main__":
    run_main(main)
