"""Validation loss during training (kohya's ``validation_split`` / ``--validate_every_n_steps`` /
``--validate_every_n_epochs`` / ``--max_validation_steps`` / ``--validation_seed``).

As kohya: the validation images (split off DreamBooth datasets) are not shuffled; every
validation pass evaluates the first ``max_validation_steps`` batches at the fixed timesteps
``linspace(min_timestep, max_timestep, 6)[1:-1]`` (200, 400, 600, 800 by default), with the
noise of a generator seeded by ``validation_seed`` (or ``seed``) at the start of each pass,
so passes are comparable; the network is evaluated without dropout and no gradient is taken.
The training random streams are not touched (Python's ``random`` is saved and restored).
The loss is the training loss (same weighting) computed by the same loss cell, compiled
once more for evaluation.
"""
from __future__ import annotations

import logging
import random

import numpy as np

logger = logging.getLogger(__name__)

NUM_VALIDATION_TIMESTEPS = 4


def validation_timesteps(min_timestep, max_timestep):
    lo = 0 if min_timestep is None else min_timestep
    hi = 1000 if max_timestep is None else max_timestep
    return np.linspace(lo, hi, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]


def should_validate_step(args, global_step, has_data):
    return has_data and args.validate_every_n_steps is not None and global_step % args.validate_every_n_steps == 0


def should_validate_epoch(args, epoch_no, has_data):
    every = args.validate_every_n_epochs
    return has_data and (epoch_no % every == 0 if every is not None else True)


class Validator:
    """Runs validation passes; ``make_inputs(batch, latents, rng, timesteps)`` builds the loss cell's
    inputs exactly as a training batch (noise options, loss weights), ``loss_net`` is the loss cell."""

    def __init__(self, args, val_group, loss_net, make_inputs, encode_latents, set_eval, set_train):
        from library.data_loader import DataLoader

        self.args = args
        self.loader = DataLoader(val_group, shuffle=False, num_workers=0) if val_group is not None else None
        self.loss_net = loss_net
        self.make_inputs = make_inputs
        self.encode_latents = encode_latents
        self.set_eval, self.set_train = set_eval, set_train
        n = len(self.loader) if self.loader is not None else 0
        self.steps = min(args.max_validation_steps, n) if args.max_validation_steps is not None else n
        self.timesteps = validation_timesteps(args.min_timestep, args.max_timestep)
        self.seed = args.validation_seed if args.validation_seed is not None else args.seed

    @property
    def has_data(self):
        return self.steps > 0

    def run(self, desc="validation"):
        """Mean loss over the pass (batches x fixed timesteps)."""
        from mindspore import Tensor  # noqa: F401  (mindspore is loaded by the trainer already)
        from tqdm import tqdm

        py_state = random.getstate()
        random.seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.set_eval()
        losses = []
        try:
            bar = tqdm(total=self.steps * len(self.timesteps), desc=desc, leave=False, dynamic_ncols=True)
            for i, batch in enumerate(self.loader):
                if i >= self.steps:
                    break
                latents = self.encode_latents(batch, rng)
                for t in self.timesteps:
                    inputs = self.make_inputs(batch, latents, rng, np.full((latents.shape[0],), t, np.int64))
                    losses.append(float(self.loss_net(*inputs).asnumpy()))
                    bar.update(1)
                    bar.set_postfix(val_avg_loss=f"{np.mean(losses):.4f}", timestep=int(t))
            bar.close()
        finally:
            self.set_train()
            random.setstate(py_state)
        return float(np.mean(losses))
