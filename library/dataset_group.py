"""``DatasetGroup`` (kohya's ConcatDataset of datasets) and ``debug_dataset``."""
from __future__ import annotations

import bisect
import logging
import random
from typing import List, Sequence, Tuple

logger = logging.getLogger(__name__)


class DatasetGroup:
    """Concatenation of datasets; index i is one batch of one dataset."""

    def __init__(self, datasets: Sequence):
        self.datasets = list(datasets)
        self.image_data = {}
        self.num_train_images = 0
        self.num_reg_images = 0
        for dataset in self.datasets:
            self.image_data.update(dataset.image_data)
            self.num_train_images += dataset.num_train_images
            self.num_reg_images += dataset.num_reg_images

    # -- ConcatDataset ----------------------------------------------------------
    def cumulative_sizes(self) -> List[int]:
        sizes, total = [], 0
        for d in self.datasets:
            total += len(d)
            sizes.append(total)
        return sizes

    def __len__(self):
        return sum(len(d) for d in self.datasets)

    def locate(self, index: int) -> Tuple[int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range ({len(self)} batches)")
        sizes = self.cumulative_sizes()
        di = bisect.bisect_right(sizes, index)
        return di, index - (sizes[di - 1] if di > 0 else 0)

    def __getitem__(self, index):
        di, local = self.locate(index)
        return self.datasets[di][local]

    # -- broadcast setters ---------------------------------------------------------
    def _each(self, name, *args):
        for dataset in self.datasets:
            getattr(dataset, name)(*args)

    def add_replacement(self, str_from, str_to):
        self._each("add_replacement", str_from, str_to)

    def set_tokenizers(self, tokenizers, max_token_length=None):
        self._each("set_tokenizers", tokenizers, max_token_length)

    def set_current_epoch(self, epoch):
        self._each("set_current_epoch", epoch)

    def set_current_step(self, step):
        self._each("set_current_step", step)

    def set_max_train_steps(self, max_train_steps):
        self._each("set_max_train_steps", max_train_steps)

    def verify_bucket_reso_steps(self, min_steps: int):
        self._each("verify_bucket_reso_steps", min_steps)

    def is_latent_cacheable(self) -> bool:
        return all(d.is_latent_cacheable() for d in self.datasets)

    def is_text_encoder_output_cacheable(self) -> bool:
        return all(d.is_text_encoder_output_cacheable() for d in self.datasets)

    def cache_latents(self, encode_fn, vae_batch_size=1, cache_to_disk=False, skip_cache_check=False):
        from library.latent_cache import cache_latents
        for i, dataset in enumerate(self.datasets):
            logger.info(f"[Dataset {i}]")
            cache_latents(dataset, encode_fn, vae_batch_size, cache_to_disk, skip_cache_check)

    def cache_text_encoder_outputs(self, encode_fn, tokenizers, max_token_length=None, cache_to_disk=False,
                                   batch_size=None, skip_cache_check=False, weighted=False):
        from library.latent_cache import cache_text_encoder_outputs
        for i, dataset in enumerate(self.datasets):
            logger.info(f"[Dataset {i}]")
            cache_text_encoder_outputs(dataset, encode_fn, tokenizers, max_token_length, cache_to_disk,
                                       batch_size, skip_cache_check, weighted=weighted)


def format_example_lines(dataset, example) -> List[str]:
    """kohya's per-sample debug line for one batch."""
    lines = []
    if example["latents"] is not None:
        lines.append(f"sample has latents from npz file: {tuple(example['latents'].shape)}")
    for j, key in enumerate(example["image_keys"]):
        size = dataset.image_data[key].image_size
        lines.append(
            f'{key}, size: {size}, loss weight: {float(example["loss_weights"][j])}, '
            f'caption: "{example["captions"][j]}", original size: {example["original_sizes_hw"][j].tolist()}, '
            f'crop top left: {example["crop_top_lefts"][j].tolist()}, '
            f'target size: {example["target_sizes_hw"][j].tolist()}, flipped: {example["flippeds"][j]}')
        lines.append(f"network multiplier: {float(example['network_multipliers'][j])}")
        lines.append(f"custom attributes: {example['custom_attributes'][j]}")
        if example["images"] is not None:
            lines.append(f"image size: {tuple(example['images'][j].shape)}")
        if example.get("alpha_masks") is not None:
            lines.append(f"alpha mask size: {tuple(example['alpha_masks'][j].shape)}")
    return lines


def debug_dataset(train_dataset, show_input_ids=False, max_epochs=1, max_steps=None, printer=print):
    """Print what every batch holds (kohya's ``--debug_dataset``), without training.

    kohya shows each image in an OpenCV window on Windows and waits for a key;
    here the batches are printed only. kohya stops after 9 batches when the
    data are cached latents; we do the same, and stop after ``max_epochs``
    epochs (kohya loops until Esc)."""
    printer(f"Total dataset length (steps): {len(train_dataset)}")
    epoch = 1
    while epoch <= max_epochs:
        printer("")
        printer(f"epoch: {epoch}")
        steps = (epoch - 1) * len(train_dataset) + 1
        indices = list(range(len(train_dataset)))
        random.shuffle(indices)
        for i, idx in enumerate(indices):
            train_dataset.set_current_epoch(epoch)
            train_dataset.set_current_step(steps)
            printer(f"steps: {steps} ({i + 1}/{len(train_dataset)})")
            example = train_dataset[idx]
            di, _ = train_dataset.locate(idx) if hasattr(train_dataset, "locate") else (0, idx)
            dataset = train_dataset.datasets[di] if hasattr(train_dataset, "datasets") else train_dataset
            for line in format_example_lines(dataset, example):
                printer(line)
            if show_input_ids and example.get("input_ids_list") is not None:
                for j in range(len(example["captions"])):
                    printer(f"input ids: {example['input_ids_list'][0][j].tolist()}")
                    printer(f"input ids2: {example['input_ids_list'][1][j].tolist()}")
            steps += 1
            if max_steps is not None and steps > max_steps:
                return
            if example["images"] is None and i >= 8:
                return
        epoch += 1
