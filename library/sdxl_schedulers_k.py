"""The k-diffusion samplers of kohya's names in sigma space, each following its diffusers 0.35.2 class:
``LMSDiscreteScheduler`` (``lms``, ``k_lms``), ``HeunDiscreteScheduler`` (``heun``),
``KDPM2DiscreteScheduler`` (``dpm_2``, ``k_dpm_2``) and ``KDPM2AncestralDiscreteScheduler``
(``dpm_2_a``, ``k_dpm_2_a``). No Karras/exponential/beta sigmas (kohya never sets them).

Heun and the KDPM2 pair are second order: diffusers' ``timesteps`` list has ``2n - 1`` entries (one model
evaluation each; the last step is a single Euler step to sigma 0) and the scheduler alternates between a
first-order step (it keeps the sample) and the correction that finishes the step from the kept sample.
Here ``step(..., i, ...)`` and ``input_scale(i)`` take the position ``i`` in that list, so
``Generator.sample`` drives them like any other sampler; ``step`` must be called for i = 0, 1, ... in order
(``set_timesteps`` and i == 0 reset the kept state). Which half a position is follows from its parity,
as diffusers' state does when the steps are taken in order.

Registered in ``library.sdxl_schedulers`` (import them from there).
"""
from typing import Optional

import numpy as np

from library.sdxl_schedulers_base import _SigmaScheduler


def _log32(x):
    """float32 log through float64: the correctly rounded value, which torch's float32 log gives; numpy's own
    float32 log differs by an ulp on some CPUs (its AVX-512 kernels)."""
    return np.log(np.asarray(x, np.float64)).astype(np.float32)


def _exp32(x):
    """float32 exp through float64 (see ``_log32``)."""
    return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def _sigma_to_t(sigmas, log_sigmas):
    """diffusers' ``_sigma_to_t``: the fractional training timestep of each sigma, linear in log sigma."""
    sigmas = np.asarray(sigmas, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):  # NaN/0 entries are never used (as in diffusers)
        log_sigma = _log32(np.maximum(sigmas, np.float32(1e-10)))
        dists = log_sigma[None, :] - log_sigmas[:, None]
        low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).astype(np.float32)


def _repeat_inner(x):
    """``cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])``: KDPM2's per-evaluation view of a per-step array."""
    return np.concatenate([x[:1], np.repeat(x[1:], 2), x[-1:]])


def _log_midpoint(a, b):
    """``exp(lerp(log a, log b, 0.5))`` with torch's lerp formula for weight 0.5 (``end - (end - start) / 2``),
    so that a zero end gives 0 and a zero start NaN, as in diffusers (those entries are never used)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = _log32(a.astype(np.float32)), _log32(b.astype(np.float32))
        return _exp32(lb - (lb - la) * np.float32(0.5))


class LMSDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``LMSDiscreteScheduler``, order 4: the Euler sigmas; the step integrates the Lagrange
    polynomial through the last (up to 4) derivatives over ``[sigma_i, sigma_i+1]``.

    diffusers integrates with ``scipy.integrate.quad`` (exact for these cubic polynomials); here the
    polynomial is integrated in closed form (float64). ``step`` in order from i = 0."""

    name = "lms"
    _linspace_dtype = np.float32
    order = 4

    def set_timesteps(self, num_inference_steps: int):
        self._derivatives = []
        return super().set_timesteps(num_inference_steps)

    def _lms_coefficient(self, order, t, current_order):
        s = self.sigmas.astype(np.float64)
        roots = [s[t - k] for k in range(order) if k != current_order]
        denom = np.prod([s[t - current_order] - r for r in roots]) if roots else 1.0
        poly = np.polynomial.Polynomial.fromroots(roots) if roots else np.polynomial.Polynomial([1.0])
        antiderivative = poly.integ()
        return float((antiderivative(s[t + 1]) - antiderivative(s[t])) / denom)

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        if step_index == 0:
            self._derivatives = []
        sigma = self.sigmas[step_index]
        derivative = (sample - self._pred_original_sample(model_output, sample, sigma)) / sigma
        self._derivatives = (self._derivatives + [derivative])[-self.order:]
        order = min(step_index + 1, self.order)
        coeffs = [self._lms_coefficient(order, step_index, k) for k in range(order)]
        prev = sample
        for coeff, d in zip(coeffs, reversed(self._derivatives)):
            prev = prev + np.float32(coeff) * d
        return prev.astype(np.float32)


class HeunDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``HeunDiscreteScheduler``: Euler to the next sigma (even positions), then the average of
    both derivatives from the kept sample (odd positions). ``clip_sample``: x0 clipped to
    ``[-clip_sample_range, clip_sample_range]`` (kohya's get_my_scheduler forces it on)."""

    name = "heun"
    _linspace_dtype = np.float32

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon", clip_sample=False,
                 clip_sample_range=1.0):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = np.float32(clip_sample_range)
        self._kept = None

    def set_timesteps(self, num_inference_steps: int):
        timesteps, sigmas = self._sigma_timesteps(num_inference_steps)
        # [s0, s1, s1, ..., s_n-1, s_n-1, 0] and [t0, t1, t1, ..., t_n-1, t_n-1]: one entry per model evaluation
        self.sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        self.timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        self._kept = None
        return self.timesteps

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        i = step_index
        first = i % 2 == 0
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        x0 = self._pred_original_sample(model_output, sample, sigma if first else sigma_next)
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        if first:
            derivative = (sample - x0) / sigma
            self._kept = (derivative, sigma_next - sigma, sample)
            return (sample + derivative * (sigma_next - sigma)).astype(np.float32)
        prev_derivative, dt, kept = self._kept
        self._kept = None
        derivative = (prev_derivative + (sample - x0) / sigma_next) / np.float32(2)
        return (kept + derivative * dt).astype(np.float32)


class KDPM2DiscreteScheduler(_SigmaScheduler):
    """diffusers' ``KDPM2DiscreteScheduler`` (DPM-Solver-2 of k-diffusion): an Euler step to the log-midpoint
    sigma ``sqrt(sigma_i * sigma_i+1)`` (even positions, model evaluated at sigma_i), then the full step from
    the kept sample with the derivative evaluated at the midpoint (odd positions, at the midpoint's
    fractional timestep)."""

    name = "dpm_2"
    _linspace_dtype = np.float32

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon"):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type)
        self.log_sigmas = _log32(self.train_sigmas)
        self.sigmas_interpol = None
        self._kept = None

    def set_timesteps(self, num_inference_steps: int):
        timesteps, sigmas = self._sigma_timesteps(num_inference_steps)
        sigmas_interpol = _log_midpoint(sigmas, np.roll(sigmas, 1))  # between sigma_j and sigma_j-1
        self.sigmas = _repeat_inner(sigmas)
        self.sigmas_interpol = _repeat_inner(sigmas_interpol)
        # [t0, t_mid1, t1, t_mid2, t2, ...]: the midpoints' fractional timesteps between the steps'
        mid = _sigma_to_t(sigmas_interpol, self.log_sigmas)[1:-1]
        self.timesteps = np.concatenate([timesteps[:1], np.stack([mid, timesteps[1:]], -1).reshape(-1)])
        self._kept = None
        return self.timesteps

    def input_scale(self, step_index: int):
        i = step_index
        sigma = self.sigmas[i] if i % 2 == 0 else self.sigmas_interpol[i]
        return np.float32((sigma ** 2 + 1) ** 0.5)

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        i = step_index
        if i % 2 == 0:
            sigma, sigma_interpol = self.sigmas[i], self.sigmas_interpol[i + 1]
            derivative = (sample - self._pred_original_sample(model_output, sample, sigma)) / sigma
            self._kept = sample
            return (sample + derivative * (sigma_interpol - sigma)).astype(np.float32)
        sigma, sigma_interpol, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
        derivative = (sample - self._pred_original_sample(model_output, sample, sigma_interpol)) / sigma_interpol
        kept, self._kept = self._kept, None
        return (kept + derivative * (sigma_next - sigma)).astype(np.float32)


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """diffusers' ``KDPM2AncestralDiscreteScheduler``: KDPM2 towards the ancestral ``sigma_down`` of each
    step, plus fresh noise of ``sigma_up`` after the correction (odd positions); the last step is an Euler
    step to 0.

    The noise comes from the numpy generator passed to ``step`` (as ``euler_a``; not torch's), so images
    differ from diffusers' for the same seed; the arithmetic is the same."""

    name = "dpm_2_a"

    def set_timesteps(self, num_inference_steps: int):
        timesteps, sigmas = self._sigma_timesteps(num_inference_steps)
        sigmas_next = np.roll(sigmas, -1)
        sigmas_next[-1] = 0.0
        with np.errstate(divide="ignore", invalid="ignore"):  # the last entry (sigma 0) is NaN, never used
            sigmas_up = ((sigmas_next ** 2 * (sigmas ** 2 - sigmas_next ** 2) / sigmas ** 2) ** 0.5)
            sigmas_down = (sigmas_next ** 2 - sigmas_up ** 2) ** 0.5
        sigmas_down[-1] = 0.0
        sigmas_interpol = _log_midpoint(sigmas, sigmas_down)
        sigmas_interpol[-2:] = 0.0
        self.sigmas = _repeat_inner(sigmas)
        self.sigmas_interpol = _repeat_inner(sigmas_interpol)
        self.sigmas_up = _repeat_inner(sigmas_up.astype(np.float32))
        self.sigmas_down = _repeat_inner(sigmas_down.astype(np.float32))
        timesteps_interpol = _sigma_to_t(sigmas_interpol, self.log_sigmas)
        self.timesteps = np.concatenate([timesteps[:1],
                                         np.stack([timesteps_interpol[:-2], timesteps[1:]], -1).reshape(-1)])
        self._kept = None
        return self.timesteps

    def input_scale(self, step_index: int):
        i = step_index
        sigma = self.sigmas[i] if i % 2 == 0 else self.sigmas_interpol[i - 1]
        return np.float32((sigma ** 2 + 1) ** 0.5)

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        i = step_index
        if i % 2 == 0:
            sigma, sigma_interpol = self.sigmas[i], self.sigmas_interpol[i]
            derivative = (sample - self._pred_original_sample(model_output, sample, sigma)) / sigma
            self._kept = sample
            return (sample + derivative * (sigma_interpol - sigma)).astype(np.float32)
        if rng is None:
            raise ValueError("dpm_2_a needs a random generator for its noise")
        j = i - 1
        sigma, sigma_interpol, sigma_up, sigma_down = (self.sigmas[j], self.sigmas_interpol[j], self.sigmas_up[j],
                                                       self.sigmas_down[j])
        derivative = (sample - self._pred_original_sample(model_output, sample, sigma_interpol)) / sigma_interpol
        kept, self._kept = self._kept, None
        prev = kept + derivative * (sigma_down - sigma)
        noise = rng.standard_normal(sample.shape, dtype=np.float32)
        return (prev + noise * sigma_up).astype(np.float32)
