"""kohya's ``finetune/merge_captions_to_metadata.py``: the caption files of a folder of images into the
fine-tuning ``metadata.json`` (``{"<image stem>": {"caption": "..."}}``) that a dataset subset's
``metadata_file`` (or ``--in_json``) reads.

    python finetune/merge_captions_to_metadata.py train_data meta_cap.json --caption_extension .txt

Each image's caption is ``<image stem><caption_extension>`` (UTF-8, stripped). An existing output (or
``--in_json``) is read first and its entries are kept: captions of images already in it are replaced,
other fields (tags) stay. A missing caption file stops the run before anything is written.
``--full_path`` keys entries by the image's absolute path (several folders in one file);
``--recursive`` (with ``--full_path``) also takes the images of sub-folders. See
``library/finetune_metadata.py`` for the file format.
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
    parser.add_argument("--caption_extention", type=str, default=None,
                        help="extension of caption file (kohya's old misspelt name, still accepted)")
    parser.add_argument("--caption_extension", type=str, default=".caption", help="extension of caption file")
    parser.add_argument("--full_path", action="store_true",
                        help="use full path as image-key in metadata (supports multiple directories)")
    parser.add_argument("--recursive", action="store_true",
                        help="recursively look for training images in all child folders of train_data_dir "
                             "(needs --full_path)")
    parser.add_argument("--debug", action="store_true", help="debug mode: log every key and caption")
    return parser


def main(argv=None):
    import logging

    from library.finetune_metadata import merge_text_files

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = setup_parser().parse_args(argv)
    if args.caption_extention is not None:
        args.caption_extension = args.caption_extention
    return merge_text_files(args.train_data_dir, args.out_json, args.in_json, args.caption_extension, "caption",
                            args.full_path, args.recursive, args.debug)


if __name__ == "__main__":
    run_main(main)
