"""Batch loading with worker processes (kohya's torch ``DataLoader`` with
``batch_size=1, shuffle=True``, ``--max_data_loader_n_workers`` and
``--persistent_data_loader_workers``), without torch.

Each dataset index is already a whole batch (one bucket), so the loader only
orders indices (a fresh permutation per epoch from ``seed + epoch``) and
fetches them, in worker processes when ``num_workers > 0``. Workers are
forked (as torch does on Linux) and own a copy of the dataset; before each
fetch they apply the shared ``current_epoch``/``current_step`` values
(``multiprocessing.Value``, kohya's collator), so bucket shuffles and caption
options see the trainer's epoch and step. Results come back in order. An
error in a worker (e.g. a ``UserError`` for a bad file) is raised in the
main process. Persistent workers live until ``close()``; otherwise they are
started for each epoch's iteration and stopped at its end.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import traceback
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)


def _apply_epoch_step(dataset, epoch: int, step: int):
    dataset.set_current_epoch(epoch)
    dataset.set_current_step(step)


def _worker_loop(dataset, tasks, results, current_epoch, current_step):
    results.cancel_join_thread()  # exit without waiting for unread results (stopped iterations)
    while True:
        task = tasks.get()
        if task is None:
            return
        tag, seq, index = task
        try:
            _apply_epoch_step(dataset, current_epoch.value, current_step.value)
            results.put((tag, seq, dataset[index], None))
        except BaseException as e:  # sent to the main process
            try:
                results.put((tag, seq, None, e))
            except Exception:
                results.put((tag, seq, None, RuntimeError(f"worker error: {e!r}\n{traceback.format_exc()}")))


class DataLoader:
    def __init__(self, dataset, shuffle: bool = True, num_workers: int = 0, persistent_workers: bool = False,
                 seed: int = 0, prefetch_factor: int = 2, timeout: float = 600.0):
        self.dataset = dataset
        self.shuffle = shuffle
        self.num_workers = max(0, min(int(num_workers), os.cpu_count() or 1))
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.seed = seed
        self.prefetch_factor = max(1, prefetch_factor)
        self.timeout = timeout
        self._ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.current_epoch = self._ctx.Value("i", 0)
        self.current_step = self._ctx.Value("i", 0)
        self._epoch_counter = 0
        self._skip = 0
        self._workers = []
        self._tasks = None
        self._results = None

    def __len__(self):
        return len(self.dataset)

    def indices(self, epoch: int):
        order = np.arange(len(self.dataset))
        if self.shuffle:
            np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).shuffle(order)
        return order.tolist()

    def start_at(self, epoch: int, position: int):
        """Make the next iteration epoch ``epoch``'s order from its ``position``-th batch on (resume):
        the skipped batches are not loaded."""
        self._epoch_counter = int(epoch)
        self._skip = int(position)

    # -- workers -------------------------------------------------------------------
    def _start_workers(self):
        if self._workers:
            return
        self._tasks = self._ctx.Queue()
        self._results = self._ctx.Queue()
        for _ in range(self.num_workers):
            p = self._ctx.Process(target=_worker_loop, args=(self.dataset, self._tasks, self._results,
                                                              self.current_epoch, self.current_step), daemon=True)
            p.start()
            self._workers.append(p)

    def close(self):
        """Stop the worker processes (the ones this loader started)."""
        if not self._workers:
            return
        for _ in self._workers:
            self._tasks.put(None)
        for p in self._workers:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
        self._workers = []
        self._tasks.close()
        self._results.close()
        self._tasks = self._results = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- iteration -------------------------------------------------------------------
    def __iter__(self):
        epoch_order = self._epoch_counter
        self._epoch_counter += 1
        order = self.indices(epoch_order)[self._skip:]
        self._skip = 0
        if self.num_workers == 0:
            for index in order:
                _apply_epoch_step(self.dataset, self.current_epoch.value, self.current_step.value)
                yield self.dataset[index]
            return

        self._start_workers()
        try:
            outstanding = self.num_workers * self.prefetch_factor
            sent = 0
            buffer = {}
            for _ in range(min(outstanding, len(order))):
                self._tasks.put((epoch_order, sent, order[sent]))
                sent += 1
            for seq in range(len(order)):
                while seq not in buffer:
                    try:
                        tag, got_seq, batch, error = self._results.get(timeout=self.timeout)
                    except queue.Empty:
                        dead = [p.pid for p in self._workers if not p.is_alive()]
                        raise RuntimeError(f"data loader timed out after {self.timeout} s"
                                           + (f" (workers {dead} died)" if dead else "")) from None
                    if tag != epoch_order:
                        continue  # left over from an iteration that stopped early
                    if error is not None:
                        raise error
                    buffer[got_seq] = batch
                if sent < len(order):
                    self._tasks.put((epoch_order, sent, order[sent]))
                    sent += 1
                yield buffer.pop(seq)
        finally:
            if not self.persistent_workers:
                self.close()
