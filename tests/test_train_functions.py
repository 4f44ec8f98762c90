"""Loss helpers and LR schedules against their closed forms (numpy only, no compilation)."""
import argparse
import math

import numpy as np
import pytest

from conftest import assert_close  # noqa: F401  (conftest imports library before mindspore)

from library import custom_train_functions as ctf  # noqa: E402
from library.device_utils import UserError  # noqa: E402
from library.train_optimizers import (create_lr_schedule, get_lr_lambda, parse_optimizer_args,  # noqa: E402
                                      resolve_warmup_steps)


def _args(**kw):
    base = dict(lr_scheduler="constant", lr_warmup_steps="0", lr_scheduler_num_cycles=1, lr_scheduler_power=1.0,
                lr_scheduler_type="", lr_scheduler_args=None, learning_rate=1e-3)
    base.update(kw)
    return argparse.Namespace(**base)


def test_noise_schedule_matches_diffusers_scaled_linear():
    s = ctf.NoiseSchedule()
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float32) ** 2
    ac = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alphas_cumprod, ac, rtol=1e-6)
    a, b = s.coefficients([0, 999])
    np.testing.assert_allclose(a ** 2 + b ** 2, 1.0, rtol=1e-6)
    z = ctf.NoiseSchedule(zero_terminal_snr=True)
    assert z.alphas_cumprod[-1] < 1e-12 and abs(z.alphas_cumprod[0] - ac[0]) < 1e-6


def test_loss_weights_formulas():
    s = ctf.NoiseSchedule()
    t = np.array([10, 500, 990])
    snr = s.all_snr[t].astype(np.float64)
    args = argparse.Namespace(min_snr_gamma=5.0, v_parameterization=False)
    np.testing.assert_allclose(ctf.post_process_loss_weights(args, t, s), np.minimum(snr, 5) / snr, rtol=1e-6)
    args = argparse.Namespace(min_snr_gamma=5.0, v_parameterization=True, scale_v_pred_loss_like_noise_pred=True)
    np.testing.assert_allclose(ctf.post_process_loss_weights(args, t, s),
                               np.minimum(snr, 5) / (snr + 1) * snr / (snr + 1), rtol=1e-6)
    args = argparse.Namespace(v_pred_like_loss=0.3, debiased_estimation_loss=True)
    scale = snr / (snr + 1)
    np.testing.assert_allclose(ctf.post_process_loss_weights(args, t, s),
                               (1 + 0.3 / scale) / np.sqrt(snr), rtol=1e-6)


def test_noise_offset_and_ip_gamma():
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(lat.shape).astype(np.float32)
    r = np.random.default_rng(1)
    out = ctf.apply_noise_offset(lat, noise, 0.1, 0.01, r)
    r = np.random.default_rng(1)
    offset = 0.1 + 0.01 * np.abs(lat.mean((2, 3), keepdims=True))
    np.testing.assert_allclose(out, noise + offset * r.standard_normal((2, 4, 1, 1)), rtol=1e-5, atol=1e-6)
    assert ctf.apply_noise_offset(lat, noise, None, None, r) is noise
    r = np.random.default_rng(2)
    out = ctf.input_perturbation_noise(noise, 0.1, r)
    r = np.random.default_rng(2)
    np.testing.assert_allclose(out, noise + 0.1 * r.standard_normal(noise.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_lr_schedules_closed_form(name):
    w, n = 10, 100
    # kohya passes num_cycles to cosine_with_restarts only (cosine keeps transformers' 0.5), power to polynomial
    sched = create_lr_schedule(_args(lr_scheduler=name, lr_warmup_steps="10",
                                     lr_scheduler_num_cycles=2 if name == "cosine_with_restarts" else 1,
                                     lr_scheduler_power=2.0 if name == "polynomial" else 1.0), [1e-3, 5e-4], n)
    for step in (0, 5, 10, 37, 99):
        lrs = sched.lrs(step)
        if step < w:
            f = step / w
        elif name == "constant_with_warmup":
            f = 1.0
        elif name == "linear":
            f = (n - step) / (n - w)
        elif name == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * (step - w) / (n - w)))
        elif name == "cosine_with_restarts":
            f = 0.5 * (1 + math.cos(math.pi * ((2 * (step - w) / (n - w)) % 1.0)))
        else:
            end = 1e-7 / 1e-3
            f = (1 - end) * (1 - (step - w) / (n - w)) ** 2 + end
        assert lrs == pytest.approx([1e-3 * f, 5e-4 * f], rel=1e-9, abs=1e-15), (name, step)


def test_warmup_forms_and_errors():
    assert resolve_warmup_steps("0.1", 200) == 20
    assert resolve_warmup_steps("5%", 200) == 10
    assert resolve_warmup_steps(7, 200) == 7
    with pytest.raises(UserError):
        get_lr_lambda("constant", 5, 100)
    with pytest.raises(UserError):
        get_lr_lambda("adafactor", 0, 100)
    assert parse_optimizer_args(["weight_decay=0.05", "betas=0.9,0.98"]) == {"weight_decay": 0.05,
                                                                           "betas": (0.9, 0.98)}


def test_random_strengths_are_one_per_batch():
    """kohya draws torch.rand(1) * strength: one strength for the whole batch, then the noise."""
    from library import custom_train_functions as ctf

    latents = np.zeros((3, 4, 8, 8), np.float32)
    noise = np.random.default_rng(1).standard_normal(latents.shape).astype(np.float32)
    got = ctf.apply_noise_offset(latents, noise, 0.1, None, np.random.default_rng(5), random_strength=True)
    replay = np.random.default_rng(5)
    s = replay.uniform(0.0, 0.1)
    np.testing.assert_allclose(got, noise + s * replay.standard_normal((3, 4, 1, 1)), rtol=1e-6, atol=1e-7)
    got = ctf.input_perturbation_noise(noise, 0.1, np.random.default_rng(6), random_strength=True)
    replay = np.random.default_rng(6)
    s = replay.uniform(0.0, 0.1)
    np.testing.assert_allclose(got, noise + s * replay.standard_normal(noise.shape), rtol=1e-6, atol=1e-7)
