"""kohya's ``tools/cache_latents.py`` (SDXL): encode every training image with the VAE once, into the
disk cache the trainer reads with ``--cache_latents_to_disk``, before training.

    python tools/cache_latents.py --sdxl --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config dataset.toml --vae_batch_size 4

It takes the trainer's arguments (``sdxl_train_network.py``'s parser, so the training command line or
its ``--config_file`` works as it is) and builds the datasets as the trainer does: the files are the
trainer's (``<image stem>_<W>x<H>_sdxl.npz`` next to each image, kohya's keys), checked as the trainer
checks them, so a training run with ``--cache_latents_to_disk`` and the same dataset finds them valid
and encodes nothing. Resumable: images whose cache file is already valid are skipped (every file is
written whole or not at all); when all are valid, not even the VAE is loaded. ``--skip_cache_check``
takes any existing file as valid, as in the trainer.

Only the VAE is loaded (``--vae``, or the checkpoint's), in float32 as the trainer caches; latents are
posterior samples drawn from ``--seed``, as the trainer draws them (the same seed gives the latents the
trainer would cache). Validation images (``validation_split``) are cached too; pass the trainer's
``--seed`` (or a ``validation_seed``) so that both draw the same split.

Arguments of kohya's tool: ``--sdxl`` (this port caches SDXL only, so it is always on), ``--flux``
(not implemented: stops), ``--skip_existing`` (deprecated in kohya: does nothing, existing files are
always checked). Training arguments the caching does not use are accepted and listed in a warning.
"""
import argparse
import logging
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (sets the CPU runtime env before mindspore loads)
from library import config_util, train_util  # noqa: E402
from library.device_utils import UserError, add_device_arguments, run_main  # noqa: E402

logger = logging.getLogger(__name__)

# arguments every caching tool uses besides the dataset and device ones
COMMON_USED = {"pretrained_model_name_or_path", "seed", "config_file", "sdxl", "flux", "skip_existing",
               "validation_split", "validation_seed"}
LATENTS_USED = {"vae", "no_half_vae"}


def setup_parser(description=__doc__) -> argparse.ArgumentParser:
    """The trainer's parser plus kohya's caching-tool switches."""
    from library.train_args import setup_parser as trainer_parser

    parser = trainer_parser()
    parser.description = description
    add = parser.add_argument
    add("--sdxl", action="store_true", help="SDXL model (kohya's switch; this port caches SDXL only: always on)")
    add("--flux", action="store_true", help="FLUX model: not implemented in this port (stops the run)")
    add("--skip_existing", action="store_true",
        help="deprecated in kohya and without effect: existing files are always checked "
             "(--skip_cache_check skips the check)")
    return parser


def _dataset_dests():
    probe = argparse.ArgumentParser(add_help=False)
    train_util.add_dataset_arguments(probe, True, True, True)
    train_util.add_text_encoder_cache_arguments(probe)
    config_util.add_config_arguments(probe)
    add_device_arguments(probe)
    return {a.dest for a in probe._actions}


def check_tool_args(args, parser, tool: str, used: set):
    """The checks before any work: arguments this port does not implement, the model paths, and a
    warning naming the given (training) arguments this tool does not use."""
    from library.train_args import check_not_implemented

    check_not_implemented(args, parser)
    if args.flux:
        raise UserError("--flux: FLUX is not implemented in this port (SDXL only)")
    if args.skip_existing:
        logger.warning("--skip_existing does nothing (deprecated in kohya): existing cache files are always "
                       "checked; use --skip_cache_check to skip the check")
    used = used | COMMON_USED | _dataset_dests()
    unused = []
    for action in parser._actions:
        if not action.option_strings or action.dest in used or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value != action.default and not (value in (None, "", [], False) and action.default in (None, "", [], False)):
            unused.append(action.option_strings[0])
    if unused:
        logger.warning(f"{tool} does not use these training arguments: {', '.join(sorted(unused))}")
    if args.pretrained_model_name_or_path is None:
        raise UserError("--pretrained_model_name_or_path is required")
    if not os.path.exists(args.pretrained_model_name_or_path):
        raise UserError(f"{args.pretrained_model_name_or_path}: checkpoint not found "
                        f"(--pretrained_model_name_or_path)")
    if "vae" in used and args.vae is not None and not os.path.exists(args.vae):
        raise UserError(f"{args.vae}: VAE not found (--vae)")
    train_util.prepare_dataset_args(args, True)
    if args.seed is not None:  # the trainer seeds `random` before it builds the datasets (buckets, splits)
        import numpy as np

        random.seed(args.seed)
        np.random.seed(args.seed % (2 ** 32))


def build_dataset_groups(args, tokenizers=None):
    """The trainer's datasets (train, and validation when split), checked as the trainer checks them
    (caching options, bucket steps, every image decoded) -> list of groups."""
    train_group, val_group = config_util.build_dataset_groups(args, tokenizers)
    # caching needs no training of the text encoders: that check is the trainer's
    train_util.verify_dataset_args(args, train_group, val_group, network_train_unet_only=True)
    groups = [g for g in (train_group, val_group) if g is not None]
    for group in groups:
        train_util.scan_dataset_group(group)
    return groups


def check_cache_folders(infos, what: str):
    """Cache files are written next to the images: every folder that gets one must be writable."""
    from library.path_utils import check_writable_folder

    for folder in sorted({os.path.dirname(os.path.abspath(info.absolute_path)) for info in infos}):
        check_writable_folder(folder, f"{what} cache")


def cache_to_disk(args, parser):
    """Fill the latents disk cache; returns ``{"images", "computed", "reused"}``."""
    from library import latent_cache

    check_tool_args(args, parser, "tools/cache_latents.py", LATENTS_USED)
    args.cache_latents = True
    args.cache_latents_to_disk = True
    groups = build_dataset_groups(args)
    plan = [(dataset, latent_cache.latents_to_compute(dataset, True, args.skip_cache_check))
            for group in groups for dataset in group.datasets]
    total = sum(len(dataset.image_data) for dataset, _ in plan)
    pending = [info for _, todo in plan for info in todo]
    summary = {"images": total, "computed": len(pending), "reused": total - len(pending)}
    if not pending:
        print(f"all {total} latents cache files are valid: nothing to compute")
        return summary
    check_cache_folders(pending, "latents")

    from library.device_utils import setup_device_from_args
    from library.latent_cache import make_vae_encode_fn
    from library.sdxl_model_util import load_vae

    setup_device_from_args(args)
    vae = load_vae(args.vae or args.pretrained_model_name_or_path)  # only the VAE: the rest is not needed
    for group in groups:  # one sampler per group, seeded as the trainer seeds it
        encode = make_vae_encode_fn(vae, sample=True, seed=args.seed)
        for i, dataset in enumerate(group.datasets):
            todo = next(t for d, t in plan if d is dataset)
            logger.info(f"[Dataset {i}]")
            latent_cache.cache_latents(dataset, encode, args.vae_batch_size, True, args.skip_cache_check, todo)
    print(f"cached the latents of {len(pending)} image(s) ({summary['reused']} already valid)")
    return summary


def main(argv=None):
    from library.train_args import parse_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = setup_parser()
    args = parse_args(parser, argv)
    return cache_to_disk(args, parser)


if __name__ == "__main__":
    run_main(main)
