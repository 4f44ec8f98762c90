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

from library.sdxl_schedulers_base import scaled_linear_betas

BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS = 0.00085, 0.012, 1000


class NoiseSchedule:
    """``alphas_cumprod`` and ``all_snr`` of the DDPM training schedule (float32 as diffusers)."""

    def __init__(self, beta_start=BETA_START, beta_end=BETA_END, num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                 zero_terminal_snr=False):
        betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = fix_betas_for_zero_terminal_snr(betas)
        self.betas = betas.astype(np.float32)
        # float32 accumulation: DDPMScheduler's values within 1e-6 relative (the sampling schedulers'
        # float64 accumulation is 1.1e-6 off DDPMScheduler's at two timesteps)
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
    if random_strength:  # one strength for the batch (kohya: torch.rand(1) * noise_offset)
        noise_offset = np.float32(rng.uniform(0.0, noise_offset))
    if adaptive_noise_scale is not None:
        latent_mean = np.abs(latents.mean(axis=(2, 3), keepdims=True))
        noise_offset = np.maximum(noise_offset + adaptive_noise_scale * latent_mean, 0.0)
    return (noise + noise_offset * rng.standard_normal((b, c, 1, 1))).astype(np.float32)


def input_perturbation_noise(noise, ip_noise_gamma, rng, random_strength=False):
    """kohya's ``--ip_noise_gamma``: the noisy latents use noise + gamma * N(0,1); the target keeps noise."""
    if ip_noise_gamma is None or ip_noise_gamma == 0:
        return noise
    # one strength for the batch (kohya: torch.rand(1) * ip_noise_gamma)
    gamma = np.float32(rng.uniform(0.0, ip_noise_gamma)) if random_strength else ip_noise_gamma
    return (noise + gamma * rng.standard_normal(noise.shape)).astype(np.float32)


def draw_noise(args, latents, rng, draw_timesteps):
    """(noise, noisy_noise, timesteps) of a batch in kohya's order (get_noise_noisy_latents_and_timesteps):
    N(0,1), noise offset, multires noise, then ``draw_timesteps(rng)``, then input perturbation; the
    target is ``noise``, the latents are noised with ``noisy_noise``."""
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    noise = apply_noise_offset(latents, noise, args.noise_offset, args.adaptive_noise_scale, rng,
                               args.noise_offset_random_strength)
    noise = pyramid_noise_like(noise, rng, args.multires_noise_iterations, args.multires_noise_discount)
    timesteps = draw_timesteps(rng)
    noisy_noise = input_perturbation_noise(noise, args.ip_noise_gamma, rng, args.ip_noise_gamma_random_strength)
    return noise, noisy_noise, timesteps


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


# -- multi-resolution (pyramid) noise ---------------------------------------------------
def _linear_indices(in_size, out_size):
    """Source indices and weights of torch's linear interpolation along one axis with
    ``align_corners=False`` and an output size (no scale factor): src = (dst + 0.5) * in/out - 0.5,
    clamped at 0; i1 = i0 + 1 except at the last input index (UpSample.h, float32 as torch)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = i0 + (i0 < in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def upsample_bilinear(x, size):
    """torch's ``nn.Upsample(size=size, mode="bilinear")`` (align_corners=False) of (B, C, h, w)."""
    x = np.asarray(x, np.float32)
    h0, h1, wh0, wh1 = _linear_indices(x.shape[2], size[0])
    c0, c1, ww0, ww1 = _linear_indices(x.shape[3], size[1])
    rows = x[:, :, h0, :] * wh0[:, None] + x[:, :, h1, :] * wh1[:, None]
    return (rows[:, :, :, c0] * ww0 + rows[:, :, :, c1] * ww1).astype(np.float32)


def pyramid_noise_like(noise, rng, iterations=6, discount=0.4):
    """kohya's ``pyramid_noise_like`` (multires noise): for i < iterations add N(0,1) drawn at
    (H, W) / r**i (r uniform in [2, 4) per level, at least 1x1) upsampled bilinearly to (H, W),
    times discount**i; stop after a level of size 1; divide by the (unbiased) std of the whole batch.
    The random numbers come from ``rng`` (numpy Generator) instead of python's random / torch."""
    if not iterations:
        return noise
    b, c, h, w = noise.shape
    noise = np.array(noise, np.float32)
    for i in range(iterations):
        r = rng.random() * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        noise += upsample_bilinear(rng.standard_normal((b, c, hn, wn)).astype(np.float32), (h, w)) \
            * np.float32(discount ** i)
        if hn == 1 or wn == 1:
            break
    return (noise / noise.std(ddof=1)).astype(np.float32)


# -- loss type (huber threshold) and masked loss ----------------------------------------
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def get_huber_threshold_if_needed(args, timesteps, schedule: NoiseSchedule):
    """kohya's ``get_huber_threshold_if_needed``: per-sample huber_c (float32 (B,)) for loss_type huber /
    smooth_l1, else None. exponential: exp(-t * ln(1/huber_c) / 1000) * huber_scale; snr:
    (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t = sqrt((1 - abar_t) / abar_t) (huber_scale
    unused, as kohya); constant: huber_c * huber_scale."""
    if getattr(args, "loss_type", "l2") not in ("huber", "smooth_l1"):
        return None
    t = np.asarray(timesteps, np.int64)
    if args.huber_schedule == "exponential":
        alpha = -np.log(args.huber_c) / schedule.num_train_timesteps
        result = np.exp(-alpha * t.astype(np.float64)) * args.huber_scale
    elif args.huber_schedule == "snr":
        ac = schedule.alphas_cumprod[t].astype(np.float64)
        with np.errstate(divide="ignore"):
            sigmas = np.sqrt((1.0 - ac) / ac)
        result = (1 - args.huber_c) / (1 + sigmas) ** 2 + args.huber_c
    elif args.huber_schedule == "constant":
        result = np.full(t.shape, args.huber_c * args.huber_scale, np.float64)
    else:
        raise ValueError(f"unknown huber schedule {args.huber_schedule}")
    return result.astype(np.float32)


def conditional_loss(model_pred, target, loss_type, huber_c=None):
    """kohya's ``conditional_loss(..., reduction="none")`` in numpy (the reference of the graph's)."""
    d = np.asarray(model_pred, np.float64) - np.asarray(target, np.float64)
    if loss_type == "l2":
        return d ** 2
    if loss_type == "l1":
        return np.abs(d)
    c = np.asarray(huber_c, np.float64).reshape(-1, *([1] * (d.ndim - 1)))
    smooth = 2 * (np.sqrt(d ** 2 + c ** 2) - c)
    if loss_type == "huber":
        return c * smooth
    if loss_type == "smooth_l1":
        return smooth
    raise ValueError(f"unsupported loss type {loss_type}")


def resize_area(x, size):
    """torch's ``F.interpolate(x, size, mode="area")`` (= adaptive_avg_pool2d) of (B, C, H, W):
    output cell i averages input rows floor(i*H/h) .. ceil((i+1)*H/h) - 1 (same for columns)."""
    x = np.asarray(x, np.float32)
    H, W = x.shape[2:]
    h, w = size

    def pool_matrix(n_in, n_out):
        m = np.zeros((n_out, n_in), np.float64)
        for i in range(n_out):
            s, e = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, s:e] = 1.0 / (e - s)
        return m

    out = np.einsum("hH,bcHW,wW->bchw", pool_matrix(H, h), x.astype(np.float64), pool_matrix(W, w))
    return out.astype(np.float32)


def loss_mask_for_batch(batch, latent_shape):
    """kohya's ``apply_masked_loss`` mask: the batch's ``alpha_masks`` (B, H, W) in [0, 1] (alpha channels or
    conditioning_data_dir mask images, see library/dataset_base.py) resized to the
    latent size with area interpolation, (B, 1, h, w) float32; ones when the batch has no alpha masks
    (kohya applies the mask whenever a batch has one, with or without --masked_loss)."""
    b, _, h, w = latent_shape
    masks = batch.get("alpha_masks") if batch is not None else None
    if masks is None:
        return np.ones((b, 1, h, w), np.float32)
    return resize_area(np.asarray(masks, np.float32)[:, None], (h, w))


def loss_extra_inputs(args, batch, timesteps, schedule, latent_shape):
    """The loss cell's per-batch inputs besides noise and weights: huber_c float32 (B,) (ones when the
    loss type has none) and the loss mask float32 (B, 1, h, w)."""
    huber_c = get_huber_threshold_if_needed(args, timesteps, schedule)
    if huber_c is None:
        huber_c = np.ones((len(timesteps),), np.float32)
    return huber_c, loss_mask_for_batch(batch, latent_shape)


def check_loss_args(args, train_dataset_group=None):
    """Start-of-run checks of the loss-type / multires / masked-loss arguments (UserError, one line)."""
    from library.device_utils import UserError

    if getattr(args, "loss_type", "l2") in ("huber", "smooth_l1"):
        if args.huber_schedule == "exponential" and not args.huber_c > 0:
            raise UserError(f"--huber_schedule exponential needs --huber_c > 0, got {args.huber_c}")
        if args.huber_c < 0:
            raise UserError(f"--huber_c must be >= 0, got {args.huber_c}")
    if getattr(args, "multires_noise_iterations", None) is not None and args.multires_noise_iterations < 0:
        raise UserError(f"--multires_noise_iterations must be >= 0, got {args.multires_noise_iterations}")
    if getattr(args, "masked_loss", False) and train_dataset_group is not None:
        # kohya trains unmasked without a mask source; here that is a mistake named at start
        if not any(getattr(s, "alpha_mask", False) or getattr(s, "conditioning_data_dir", None)
                   for d in train_dataset_group.datasets for s in d.subsets):
            raise UserError("--masked_loss needs subsets with mask images (conditioning_data_dir in the dataset "
                            ".toml) or with alpha_mask = true (or --alpha_mask)")
