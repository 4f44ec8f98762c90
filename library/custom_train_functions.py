"""kohya's ``custom_train_functions`` / loss helpers, as numpy on the noise schedule.

Every option here changes either the noise fed to the step or a per-sample
multiplicative weight of the per-sample mean loss, so it is computed on the
host in numpy (float64 schedule, as diffusers keeps ``alphas_cumprod`` in
float32 — we cast to float32 where diffusers does) and fed to the compiled
step: the graph does not change with the options.

DDPM schedule of SDXL: ``scaled_linear`` betas from 0.00085 to 0.012 over 1000
steps (diffusers ``DDPMScheduler``), optional zero terminal SNR rescale.
"""
from __future__ import annotations

import numpy as np

BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS = 0.00085, 0.012, 1000


class NoiseSchedule:
    """``alphas_cumprod`` and ``all_snr`` of the DDPM training schedule (float32 as diffusers)."""

    def __init__(self, beta_start=BETA_START, beta_end=BETA_END, num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                 zero_terminal_snr=False):
        betas = (np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float32) ** 2)
        if zero_terminal_snr:
            betas = fix_betas_for_zero_terminal_snr(betas)
        self.betas = betas.astype(np.float32)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas, dtype=np.float32)
        self.num_train_timesteps = num_train_timesteps
        ac = self.alphas_cumprod.astype(np.float64)
        with np.errstate(divide="ignore"):
            self.all_snr = (ac / (1.0 - ac)).astype(np.float32)  # kohya's prepare_scheduler_for_custom_training

    def coefficients(self, timesteps):
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) float32 (B,) each (diffusers add_noise/get_velocity)."""
        ac = self.alphas_cumprod[np.asarray(timesteps, np.int64)]
        return np.sqrt(ac).astype(np.float32), np.sqrt(1.0 - ac).astype(np.float32)

    def snr(self, timesteps):
        return self.all_snr[np.asarray(timesteps, np.int64)].astype(np.float64)


def fix_betas_for_zero_terminal_snr(betas):
    """kohya's ``fix_noise_scheduler_betas_for_zero_terminal_snr`` (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    a0, at = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - at) * a0 / (a0 - at)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = np.concatenate([alphas_bar[0:1], alphas])
    return (1.0 - alphas).astype(np.float32)


# -- noise ------------------------------------------------------------------------------
def apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale, rng, random_strength=False):
    """kohya's ``apply_noise_offset``: noise + offset * N(0,1) of shape (B, C, 1, 1)."""
    if noise_offset is None or noise_offset == 0:
        return noise
    b, c = latents.shape[:2]
    if random_strength:
        noise_offset = rng.uniform(0.0, noise_offset, size=(b, 1, 1, 1)).astype(np.float32)
    if adaptive_noise_scale is not None:
        latent_mean = np.abs(latents.mean(axis=(2, 3), keepdims=True))
        noise_offset = np.maximum(noise_offset + adaptive_noise_scale * latent_mean, 0.0)
    return (noise + noise_offset * rng.standard_normal((b, c, 1, 1))).astype(np.float32)


def input_perturbation_noise(noise, ip_noise_gamma, rng, random_strength=False):
    """kohya's ``--ip_noise_gamma``: the noisy latents use noise + gamma * N(0,1); the target keeps noise."""
    if ip_noise_gamma is None or ip_noise_gamma == 0:
        return noise
    b = noise.shape[0]
    gamma = rng.uniform(0.0, ip_noise_gamma, size=(b, 1, 1, 1)) if random_strength else ip_noise_gamma
    return (noise + gamma * rng.standard_normal(noise.shape)).astype(np.float32)


# -- per-sample loss weights -----------------------------------------------------------
def apply_snr_weight(loss, timesteps, schedule: NoiseSchedule, gamma, v_prediction=False):
    """kohya's ``apply_snr_weight`` (Min-SNR): loss * min(snr, gamma) / snr (or / (snr + 1) for v)."""
    snr = schedule.snr(timesteps)
    min_snr_gamma = np.minimum(snr, gamma)
    weight = min_snr_gamma / (snr + 1) if v_prediction else min_snr_gamma / snr
    return loss * weight.astype(np.float32)


def _snr_clamped(timesteps, schedule):
    return np.minimum(schedule.snr(timesteps), 1000.0)  # inf at t=0 with zero terminal snr limited


def get_snr_scale(timesteps, schedule):
    snr_t = _snr_clamped(timesteps, schedule)
    return snr_t / (snr_t + 1)


def scale_v_prediction_loss_like_noise_prediction(loss, timesteps, schedule):
    return loss * get_snr_scale(timesteps, schedule).astype(np.float32)


def add_v_prediction_like_loss(loss, timesteps, schedule, v_pred_like_loss):
    scale = get_snr_scale(timesteps, schedule)
    return (loss + loss / scale * v_pred_like_loss).astype(np.float32)


def apply_debiased_estimation(loss, timesteps, schedule, v_prediction=False):
    snr_t = _snr_clamped(timesteps, schedule)
    weight = 1.0 / (snr_t + 1) if v_prediction else 1.0 / np.sqrt(snr_t)
    return (loss * weight).astype(np.float32)


def post_process_loss_weights(args, timesteps, schedule):
    """The product of kohya's ``post_process_loss`` factors for each sample (float32 (B,)),
    applied to the per-sample mean loss (they are all multiplicative)."""
    w = np.ones(len(timesteps), np.float64)
    v = bool(getattr(args, "v_parameterization", False))
    if getattr(args, "min_snr_gamma", None):
        w = apply_snr_weight(w, timesteps, schedule, args.min_snr_gamma, v)
    if getattr(args, "scale_v_pred_loss_like_noise_pred", False):
        w = scale_v_prediction_loss_like_noise_prediction(w, timesteps, schedule)
    if getattr(args, "v_pred_like_loss", None):
        w = add_v_prediction_like_loss(w, timesteps, schedule, args.v_pred_like_loss)
    if getattr(args, "debiased_estimation_loss", False):
        w = apply_debiased_estimation(w, timesteps, schedule, v)
    return np.asarray(w, np.float32)
