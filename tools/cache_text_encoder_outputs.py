"""kohya's ``tools/cache_text_encoder_outputs.py`` (SDXL): encode every training caption with the two
text encoders once, into the disk cache the trainer reads with ``--cache_text_encoder_outputs_to_disk``,
before training.

    python tools/cache_text_encoder_outputs.py --sdxl --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config dataset.toml --max_token_length 225

It takes the trainer's arguments (``sdxl_train_network.py``'s parser; the training command line or its
``--config_file`` works as it is), builds the datasets as the trainer does and encodes with the
trainer's own caching code (``SdxlNetworkTrainer.cache_text_encoder_outputs``): the files are the
trainer's (``<image stem>_te_outputs.npz`` next to each image: ``hidden_state1``, ``hidden_state2``,
``pool2`` and the caption's hash), so a training run with the same dataset and ``--max_token_length``
finds them valid and encodes nothing (``--weighted_captions`` as in the trainer: the weighted outputs,
as kohya's tool writes them with it). Resumable: captions whose cache file is already valid are
skipped; when all are valid, the text encoders are not even loaded. Captions are encoded in batches
of the dataset's batch size (``--train_batch_size`` or the config's ``batch_size``).

Only the two text encoders are loaded (not the U-Net), in ``--mixed_precision``'s dtype as the trainer
casts them before caching. As in the trainer, caption shuffling, dropout and token warm-up stop the run
(a cached caption cannot change). ``--sdxl``, ``--flux`` and ``--skip_existing`` as in
``tools/cache_latents.py``.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import library  # noqa: E402,F401  (sets the CPU runtime env before mindspore loads)
from library.device_utils import run_main  # noqa: E402

import cache_latents  # noqa: E402  (kohya's tool imports its sibling too)

logger = logging.getLogger(__name__)

TEXT_ENCODER_USED = {"max_token_length", "mixed_precision", "train_batch_size", "network_train_unet_only",
                     "tokenizer_cache_dir", "weighted_captions"}


def cache_to_disk(args, parser):
    """Fill the text encoder outputs disk cache; returns ``{"images", "computed", "reused"}``."""
    from library import latent_cache
    from sdxl_train_network import SdxlNetworkTrainer

    cache_latents.check_tool_args(args, parser, "tools/cache_text_encoder_outputs.py", TEXT_ENCODER_USED)
    args.cache_text_encoder_outputs = True
    args.cache_text_encoder_outputs_to_disk = True
    trainer = SdxlNetworkTrainer()
    tokenizers = trainer.load_tokenizers(args)
    groups = cache_latents.build_dataset_groups(args, tokenizers)
    datasets = [dataset for group in groups for dataset in group.datasets]
    total = sum(len(dataset.image_data) for dataset in datasets)
    pending = [info for dataset in datasets for info in latent_cache.text_encoder_outputs_to_compute(
        dataset, args.max_token_length, True, args.skip_cache_check, bool(args.weighted_captions))]
    summary = {"images": total, "computed": len(pending), "reused": total - len(pending)}
    if not pending:
        print(f"all {total} text encoder outputs cache files are valid: nothing to compute")
        return summary
    cache_latents.check_cache_folders(pending, "text encoder outputs")

    from library.device_utils import check_dtype_supported, setup_device_from_args
    from library.dtypes import ms_dtype
    from library.sdxl_checkpoint import load_text_encoders_from_sdxl_checkpoint

    target = setup_device_from_args(args)
    if args.mixed_precision != "no":
        check_dtype_supported(args.mixed_precision, target)
    text_encoders = list(load_text_encoders_from_sdxl_checkpoint(args.pretrained_model_name_or_path))
    if args.mixed_precision != "no":  # the trainer casts the frozen text encoders before it caches
        from library.clip_text_model import cast_params

        for te in text_encoders:
            cast_params(te, ms_dtype(args.mixed_precision))
    trainer.cache_text_encoder_outputs(args, text_encoders, groups)
    print(f"cached the text encoder outputs of {len(pending)} caption(s) ({summary['reused']} already valid)")
    return summary


def main(argv=None):
    from library.train_args import parse_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = cache_latents.setup_parser(__doc__)
    args = parse_args(parser, argv)
    return cache_to_disk(args, parser)


if __name__ == "__main__":
    run_main(main)
