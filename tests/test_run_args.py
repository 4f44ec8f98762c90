"""The run's read-only view of its validated arguments (library/run_args.py)."""
import argparse

import pytest

from library.run_args import RunArgs


def test_run_args_reads_derives_and_refuses_writes():
    validated = argparse.Namespace(max_train_steps=1600, max_train_epochs=2, seed=None)
    args = RunArgs(validated)
    assert args.max_train_steps == 1600 and getattr(args, "missing", "default") == "default"
    args.derive(max_train_steps=40, seed=7)
    assert (args.max_train_steps, args.seed, args.max_train_epochs) == (40, 7, 2)
    assert vars(args) == {"max_train_steps": 40, "max_train_epochs": 2, "seed": 7}
    assert args.derived == {"max_train_steps": 40, "seed": 7}
    assert vars(validated) == {"max_train_steps": 1600, "max_train_epochs": 2, "seed": None}  # untouched
    with pytest.raises(AttributeError, match="read-only"):
        args.max_train_steps = 3
    with pytest.raises(AttributeError, match="not an argument"):
        args.derive(max_train_step=3)  # a misspelt name would be read by nobody
