"""What every sampler of ``library.sdxl_schedulers`` shares: SDXL's scheduler config, the beta schedule, the
config checks (``_Scheduler``) and the sigma-space schedule of diffusers' Euler/LMS/Heun/KDPM2 classes
(``_SigmaScheduler``).

A module of its own so that the scheduler modules (``sdxl_schedulers``, ``sdxl_schedulers_k``,
``sdxl_schedulers_multistep``) import their bases from here, not from each other: ``sdxl_schedulers``
holds the registry of all of them, and a base there would make the imports circular.
"""
from typing import Optional

import numpy as np

from library.device_utils import UserError

# SDXL's scheduler_config.json (the keys a class does not have are ignored, as diffusers' from_config does)
SDXL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                             prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                             skip_prk_steps=True)

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def scaled_linear_betas(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """float32 betas of the scaled-linear (sqrt-space linear) schedule, SDXL's training schedule."""
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float32) ** 2


def scaled_linear_alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """float32 ``alphas_cumprod`` of the scaled-linear beta schedule."""
    betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
    # accumulated in float64 as torch's CPU cumprod does for float32 (within 1 ulp of diffusers' values)
    return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)


class _Scheduler:
    """Shared config checks and the beta schedule; subclasses set timesteps and step."""

    name = None

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon"):
        if beta_schedule != "scaled_linear":
            raise UserError(f"beta_schedule '{beta_schedule}' is not supported (only scaled_linear, SDXL's)")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise UserError(f"timestep_spacing '{timestep_spacing}': choose one of {', '.join(TIMESTEP_SPACINGS)}")
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"prediction_type '{prediction_type}' is not supported ({', '.join(PREDICTION_TYPES)})")
        self.num_train_timesteps = num_train_timesteps
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.prediction_type = prediction_type
        self.alphas_cumprod = scaled_linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        self.timesteps = None
        self.num_inference_steps = None

    def _check_steps(self, n):
        n = int(n)
        if n < 1 or n > self.num_train_timesteps:
            raise UserError(f"number of steps {n} must be between 1 and {self.num_train_timesteps}")
        return n

    def _spaced_timesteps(self, n, spaced_over=None, linspace_dtype=np.float64, round_linspace=True):
        """The first ``n`` of diffusers' descending timesteps in ``timestep_spacing`` (float64, integral but
        for an unrounded linspace). ``spaced_over``: how many points linspace and leading spread over (the
        multistep solvers space ``n + 1`` and drop the last); trailing always spaces ``n``."""
        m, n_train = spaced_over or n, self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, m, dtype=linspace_dtype)
            return (timesteps.round() if round_linspace else timesteps)[::-1][:n].copy()
        if self.timestep_spacing == "leading":
            return (np.arange(0, m) * (n_train // m)).round()[::-1][:n] + self.steps_offset
        return np.arange(n_train, 0, -n_train / n).round() - 1  # trailing

    @property
    def init_noise_sigma(self):
        return np.float32(1.0)

    def input_scale(self, step_index: int):
        """The divisor of ``scale_model_input`` (1: alpha-space samplers do not scale the input)."""
        return np.float32(1.0)

    def scale_model_input(self, sample, step_index: int):
        return (np.asarray(sample, np.float32) / self.input_scale(step_index)).astype(np.float32)

    def step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        """The sample after the model evaluation ``step_index`` of the schedule (float32); ``rng`` draws the
        noise of the ancestral samplers."""
        return self._step(np.asarray(model_output, np.float32), step_index, np.asarray(sample, np.float32), rng)


class _SigmaScheduler(_Scheduler):
    """The sigma-space schedule of diffusers' Euler, LMS, Heun and KDPM2 classes (no Karras/exponential/beta
    sigmas): ``n`` timesteps by ``timestep_spacing``, their sigmas interpolated linearly in the training
    sigmas, then 0; ``init_noise_sigma`` the largest sigma (``sqrt(max^2 + 1)`` for leading spacing)."""

    # diffusers' Euler builds the linspace timesteps in float64, LMS/Heun/KDPM2 in float32 (values differ
    # in the last bits, and the U-Net sees them)
    _linspace_dtype = np.float64

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon"):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type)
        self.train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).astype(np.float32)
        self.sigmas = None

    def _sigma_timesteps(self, num_inference_steps: int):
        """-> (timesteps float32, sigmas float32 with the final 0 appended), as diffusers' ``set_timesteps``."""
        n, n_train = self._check_steps(num_inference_steps), self.num_train_timesteps
        timesteps = self._spaced_timesteps(n, linspace_dtype=self._linspace_dtype, round_linspace=False)
        sigmas = np.interp(timesteps, np.arange(0, n_train), self.train_sigmas)
        self.num_inference_steps = n
        return np.asarray(timesteps, np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def set_timesteps(self, num_inference_steps: int):
        self.timesteps, self.sigmas = self._sigma_timesteps(num_inference_steps)
        return self.timesteps

    @property
    def init_noise_sigma(self):
        max_sigma = np.float32(self.sigmas.max())
        if self.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return np.float32((max_sigma ** 2 + 1) ** 0.5)

    def input_scale(self, step_index: int):
        """The divisor of ``scale_model_input``: ``sqrt(sigma^2 + 1)`` (float32)."""
        sigma = self.sigmas[step_index]
        return np.float32((sigma ** 2 + 1) ** 0.5)

    def _pred_original_sample(self, model_output, sample, sigma):
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + (sample / (sigma ** 2 + 1))  # v_prediction
