"""Samplers for SDXL inference, in numpy (the step itself is cheap; the U-Net runs in graph mode).

``EulerDiscreteScheduler`` and ``EulerAncestralDiscreteScheduler`` follow diffusers'
classes of the same names with SDXL's scheduler config (``scaled_linear`` betas
0.00085..0.012 over 1000 training steps, ``timestep_spacing="leading"``,
``steps_offset=1``, epsilon prediction): the same timesteps, sigmas,
``init_noise_sigma``, ``scale_model_input`` and ``step`` arithmetic, in float32
where diffusers computes in float32.

Only these samplers exist here; ``get_scheduler`` raises a ``UserError`` naming
the supported ones for any other name.
"""
from typing import Optional

import numpy as np

from library.device_utils import UserError

SDXL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                             prediction_type="epsilon")

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def scaled_linear_alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """float32 ``alphas_cumprod`` of the scaled-linear (sqrt-space linear) beta schedule."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float32) ** 2
    # accumulated in float64 as torch's CPU cumprod does for float32 (within 1 ulp of diffusers' values)
    return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)


class EulerDiscreteScheduler:
    """diffusers' ``EulerDiscreteScheduler`` (no churn, no Karras sigmas, linear interpolation)."""

    name = "euler"

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon"):
        if beta_schedule != "scaled_linear":
            raise UserError(f"beta_schedule '{beta_schedule}' is not supported (only scaled_linear, SDXL's)")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise UserError(f"timestep_spacing '{timestep_spacing}': choose one of {', '.join(TIMESTEP_SPACINGS)}")
        if prediction_type != "epsilon":
            raise UserError(f"prediction_type '{prediction_type}' is not supported (only epsilon, SDXL base's)")
        self.num_train_timesteps = num_train_timesteps
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.alphas_cumprod = scaled_linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        self.train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).astype(np.float32)
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int):
        n, n_train = int(num_inference_steps), self.num_train_timesteps
        if n < 1 or n > n_train:
            raise UserError(f"number of steps {n} must be between 1 and {n_train}")
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, n, dtype=np.float64)[::-1].copy()
        elif self.timestep_spacing == "leading":
            step_ratio = n_train // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
            timesteps += self.steps_offset
        else:  # trailing
            step_ratio = n_train / n
            timesteps = np.arange(n_train, 0, -step_ratio).round().copy().astype(np.float32)
            timesteps -= 1
        sigmas = np.interp(timesteps, np.arange(0, n_train), self.train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps, np.float32)
        self.num_inference_steps = n
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

    def scale_model_input(self, sample, step_index: int):
        return (sample / self.input_scale(step_index)).astype(np.float32)

    def step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        """One Euler step from ``sigmas[i]`` to ``sigmas[i+1]`` (epsilon prediction, float32)."""
        sample = np.asarray(sample, np.float32)
        model_output = np.asarray(model_output, np.float32)
        sigma = self.sigmas[step_index]
        pred_original_sample = sample - sigma * model_output
        derivative = (sample - pred_original_sample) / sigma
        dt = self.sigmas[step_index + 1] - sigma
        return (sample + derivative * dt).astype(np.float32)


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler``: Euler to ``sigma_down`` plus fresh noise of ``sigma_up``.

    The noise comes from the numpy generator passed to ``step`` (not torch's), so images differ from
    diffusers' for the same seed; the arithmetic is the same.
    """

    name = "euler_a"

    def step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        if rng is None:
            raise ValueError("euler_a needs a random generator for its noise")
        sample = np.asarray(sample, np.float32)
        model_output = np.asarray(model_output, np.float32)
        sigma = self.sigmas[step_index]
        pred_original_sample = sample - sigma * model_output
        sigma_from, sigma_to = sigma, self.sigmas[step_index + 1]
        sigma_up = np.float32((sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
        sigma_down = np.float32((sigma_to ** 2 - sigma_up ** 2) ** 0.5)
        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev = sample + derivative * dt
        noise = rng.standard_normal(sample.shape, dtype=np.float32)
        return (prev + noise * sigma_up).astype(np.float32)


SCHEDULERS = {"euler": EulerDiscreteScheduler, "k_euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "k_euler_a": EulerAncestralDiscreteScheduler}
# kohya's other sampler names: accepted by name only to say they are not implemented here
KOHYA_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                  "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")


def get_scheduler(name: str, **overrides):
    """Scheduler for a kohya sampler name with SDXL's config; a clear error for any other."""
    key = str(name).lower()
    if key not in SCHEDULERS:
        known = " (a kohya sampler not implemented in this port)" if key in KOHYA_SAMPLERS else ""
        raise UserError(f"--sampler {name}{known}: supported samplers are {', '.join(SCHEDULERS)}")
    return SCHEDULERS[key](**{**SDXL_SCHEDULER_CONFIG, **overrides})
