"""Shared pytest setup: ``library`` is imported before mindspore (CPU ISA env),
full-size SDXL tests are opt-in (``--runslow`` or RUN_SLOW=1)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import library  # noqa: E402,F401  (sets ONEDNN_MAX_CPU_ISA before mindspore loads)
import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run full-size SDXL tests (minutes, >10 GB RAM)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size SDXL test, opt-in with --runslow or RUN_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="full-size test: pass --runslow (or RUN_SLOW=1) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_context():
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield


@pytest.fixture(params=list(MODES))
def ms_mode(request):
    """Run the test once in graph mode and once in PyNative mode."""
    ms.set_context(mode=MODES[request.param])
    return request.param


def assert_close(actual, expected, rtol_scale=1e-4, what="output"):
    """fp32 parity bound of the project: max|a-e| <= rtol_scale * max(1, max|e|)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected).max()
    bound = rtol_scale * max(1.0, np.abs(expected).max())
    assert err <= bound, f"{what}: max abs error {err:.3g} > bound {bound:.3g}"
    return err


def optimizer_args(**kw):
    """The trainer's optimizer/scheduler arguments at their defaults (a Namespace), overridden by ``kw``."""
    import argparse

    base = dict(optimizer_type="", optimizer_args=None, use_8bit_adam=False, use_lion_optimizer=False,
                learning_rate=1e-2, unet_lr=None, text_encoder_lr=None, max_grad_norm=1.0,
                lr_scheduler="constant", lr_warmup_steps="0", lr_scheduler_num_cycles=1, lr_scheduler_power=1.0,
                lr_scheduler_type="", lr_scheduler_args=None, lr_decay_steps="0", lr_scheduler_timescale=None,
                lr_scheduler_min_lr_ratio=None, max_train_steps=100, max_train_epochs=None)
    base.update(kw)
    return argparse.Namespace(**base)
