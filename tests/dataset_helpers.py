"""Helpers for the dataset tests: small real image files, argument namespaces, dataset configs and groups,
and stand-in latent caching with the alpha-mask batches it yields."""
import argparse
import os
import random

import numpy as np
import toml
from PIL import Image

from library import config_util, train_util


def write_image(path, width, height, seed=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_text(path, text, encoding="utf-8"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding=encoding) as f:
        f.write(text)
    return path


def make_parser():
    parser = argparse.ArgumentParser()
    train_util.add_dataset_arguments(parser)
    train_util.add_data_loader_arguments(parser)
    train_util.add_text_encoder_cache_arguments(parser)
    config_util.add_config_arguments(parser)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    parser.add_argument("--max_token_length", type=int, default=None)
    parser.add_argument("--network_train_unet_only", action="store_true")
    return parser


def parse_args(argv):
    args = make_parser().parse_args([str(a) for a in argv])
    train_util.prepare_dataset_args(args)
    return args


def write_toml(path, text):
    return write_text(str(path), text)


def build_group(tmp_path, text, *argv, name="ds.toml"):
    """The train dataset group built from the dataset config ``text`` (written to ``tmp_path / name``)."""
    cfg = write_toml(tmp_path / name, text)
    random.seed(0)
    return config_util.build_dataset_groups(parse_args(["--dataset_config", cfg, *argv]))[0]


def dataset_toml(*datasets, **general):
    """Dataset config TOML text: ``[general]`` from the keywords, a ``[[datasets]]`` per dict, whose ``subsets``
    list of dicts gives its ``[[datasets.subsets]]`` (paths may be ``Path`` objects)."""
    doc = {"datasets": list(datasets)}
    if general:
        doc["general"] = general
    return toml.dumps(doc, encoder=toml.TomlPathlibEncoder())


CACHE_ARGV = {"none": [], "memory": ["--cache_latents"], "disk": ["--cache_latents_to_disk"]}


def cache_stub_latents(group, cache):
    """Caches the group's latents in memory or on disk (``cache``; "none" leaves them) with an 8x8 average,
    4 channels, standing in for the VAE (64x64 images)."""
    if cache == "none":
        return

    def encode(images):
        x = images.reshape(images.shape[0], 3, 8, 8, 8, 8).mean((3, 5))
        return np.concatenate([x, x[:, :1]], 1).astype(np.float32)
    group.cache_latents(encode, 2, cache == "disk")


def masked_samples(group, cache, draws=12):
    """(batch, j, key, flipped, mask) for each sample of ``draws`` draws of the group's first batch, each batch
    checked to hold (2, 64, 64) float32 alpha masks, and latents exactly when ``cache`` is not "none"."""
    for _ in range(draws):
        batch = group[0]
        masks = batch["alpha_masks"]
        assert masks is not None and masks.shape == (2, 64, 64) and masks.dtype == np.float32
        assert (batch["latents"] is None) == (cache == "none")
        for j, key in enumerate(batch["image_keys"]):
            yield batch, j, key, batch["flippeds"][j], masks[j]
