"""Samplers for SDXL inference and training samples, in numpy (the step is cheap; the U-Net runs in graph mode).

Each class follows the diffusers class of the same name: the same timesteps, ``init_noise_sigma``,
``scale_model_input`` and ``step`` arithmetic, in float32 where diffusers computes in float32.

- ``EulerDiscreteScheduler`` (``euler``, ``k_euler``) and ``EulerAncestralDiscreteScheduler``
  (``euler_a``, ``k_euler_a``): sigma space; the model input is divided by ``sqrt(sigma^2 + 1)``.
- ``DDIMScheduler`` (``ddim``): deterministic DDIM (eta 0, as kohya's pipeline calls it).
- ``DPMSolverMultistepScheduler`` (``dpmsolver++``): DPM-Solver++ (2M), ``solver_order`` 2,
  ``solver_type`` midpoint, ``lower_order_final``, ``final_sigmas_type`` zero (diffusers' defaults,
  which kohya uses).

DDIM and DPM-Solver++ work in alpha space: their model input is not scaled (``input_scale`` 1) and
``init_noise_sigma`` is 1. Every class has the same interface, which ``Generator.sample`` uses:
``set_timesteps(n)``, ``timesteps``, ``init_noise_sigma``, ``input_scale(i)`` (the divisor of
``scale_model_input``, applied inside the compiled U-Net step), ``scale_model_input(sample, i)``
and ``step(model_output, i, sample, rng)`` with the step *index* ``i``. ``prediction_type``
epsilon or v_prediction.

Two configurations: ``SDXL_SCHEDULER_CONFIG`` (SDXL's ``scheduler_config.json``: leading spacing,
``steps_offset`` 1, DDIM without clipping and with ``set_alpha_to_one`` False), which
``sdxl_minimal_inference.py`` uses (``get_scheduler``), and kohya's ``get_my_scheduler`` for
training samples (``get_kohya_scheduler``): each diffusers class's own defaults with SDXL's betas,
and ``clip_sample`` forced on (DDIM), exactly what kohya constructs.

Only these samplers exist here; kohya's other names (pndm, lms, heun, dpm_2, ...) raise a
``UserError`` naming the supported ones.
"""
import inspect
from typing import Optional

import numpy as np

from library.device_utils import UserError

SDXL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                             prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False)

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def scaled_linear_alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """float32 ``alphas_cumprod`` of the scaled-linear (sqrt-space linear) beta schedule."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float32) ** 2
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

    @property
    def init_noise_sigma(self):
        return np.float32(1.0)

    def input_scale(self, step_index: int):
        """The divisor of ``scale_model_input`` (1: alpha-space samplers do not scale the input)."""
        return np.float32(1.0)

    def scale_model_input(self, sample, step_index: int):
        return (np.asarray(sample, np.float32) / self.input_scale(step_index)).astype(np.float32)


class EulerDiscreteScheduler(_Scheduler):
    """diffusers' ``EulerDiscreteScheduler`` (no churn, no Karras sigmas, linear interpolation)."""

    name = "euler"

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon"):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type)
        self.train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).astype(np.float32)
        self.sigmas = None

    def set_timesteps(self, num_inference_steps: int):
        n, n_train = self._check_steps(num_inference_steps), self.num_train_timesteps
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

    def _pred_original_sample(self, model_output, sample, sigma):
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + (sample / (sigma ** 2 + 1))  # v_prediction

    def step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        """One Euler step from ``sigmas[i]`` to ``sigmas[i+1]`` (float32)."""
        sample = np.asarray(sample, np.float32)
        model_output = np.asarray(model_output, np.float32)
        sigma = self.sigmas[step_index]
        pred_original_sample = self._pred_original_sample(model_output, sample, sigma)
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
        pred_original_sample = self._pred_original_sample(model_output, sample, sigma)
        sigma_from, sigma_to = sigma, self.sigmas[step_index + 1]
        sigma_up = np.float32((sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
        sigma_down = np.float32((sigma_to ** 2 - sigma_up ** 2) ** 0.5)
        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev = sample + derivative * dt
        noise = rng.standard_normal(sample.shape, dtype=np.float32)
        return (prev + noise * sigma_up).astype(np.float32)


class DDIMScheduler(_Scheduler):
    """diffusers' ``DDIMScheduler`` with eta 0 (deterministic; what kohya's sample pipeline passes).

    ``x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps`` with ``x0`` clipped to
    ``[-clip_sample_range, clip_sample_range]`` when ``clip_sample``; ``a_prev`` of the last step is 1
    (``set_alpha_to_one``) or ``alphas_cumprod[0]``.
    """

    name = "ddim"

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon", clip_sample=False,
                 set_alpha_to_one=False, clip_sample_range=1.0):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = np.float32(clip_sample_range)
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int):
        n, n_train = self._check_steps(num_inference_steps), self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, n).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            step_ratio = n_train // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
            timesteps += self.steps_offset
        else:  # trailing
            step_ratio = n_train / n
            timesteps = np.round(np.arange(n_train, 0, -step_ratio)).astype(np.int64)
            timesteps -= 1
        self.timesteps = timesteps
        self.num_inference_steps = n
        return self.timesteps

    def step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        sample = np.asarray(sample, np.float32)
        model_output = np.asarray(model_output, np.float32)
        timestep = int(self.timesteps[step_index])
        prev_timestep = timestep - self.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = np.float32(1) - alpha_prod_t
        if self.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
            pred_epsilon = model_output
        else:  # v_prediction
            pred_original_sample = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
            pred_epsilon = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
        if self.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -self.clip_sample_range, self.clip_sample_range)
        pred_sample_direction = (np.float32(1) - alpha_prod_t_prev) ** 0.5 * pred_epsilon  # eta 0: std_dev_t 0
        return (alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction).astype(np.float32)


class DPMSolverMultistepScheduler(_Scheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type`` dpmsolver++, ``solver_order`` 2,
    ``solver_type`` midpoint, ``lower_order_final`` True, ``euler_at_final`` False, ``final_sigmas_type``
    zero, no thresholding, no Karras/Lu/exponential sigmas (diffusers' defaults, kohya's ``dpmsolver++``).

    First step (and the last, which goes to sigma 0) first order; the others second-order multistep
    from the last two data predictions. ``step`` must be called for i = 0, 1, ... in order after
    ``set_timesteps`` (the history is reset there).
    """

    name = "dpmsolver++"

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon", algorithm_type="dpmsolver++",
                 solver_order=2):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type)
        if algorithm_type != "dpmsolver++" or solver_order != 2:
            raise UserError(f"DPM-Solver: only algorithm_type dpmsolver++ with solver_order 2 is implemented "
                            f"(got {algorithm_type}, order {solver_order})")
        self.train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).astype(np.float32)
        self.sigmas = None
        self._outputs = []

    def set_timesteps(self, num_inference_steps: int):
        n, n_train = self._check_steps(num_inference_steps), self.num_train_timesteps
        if self.timestep_spacing == "linspace":  # lambda_min_clipped -inf: the last timestep is n_train
            timesteps = np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            step_ratio = n_train // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += self.steps_offset
        else:  # trailing
            step_ratio = n_train / n
            timesteps = np.arange(n_train, 0, -step_ratio).round().copy().astype(np.int64)
            timesteps -= 1
        sigmas = np.interp(timesteps, np.arange(0, n_train), self.train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps
        self.num_inference_steps = len(timesteps)
        self._outputs = []
        return self.timesteps

    @staticmethod
    def _alpha_sigma(sigma):
        alpha_t = np.float32(1) / ((sigma ** 2 + np.float32(1)) ** np.float32(0.5))
        return np.float32(alpha_t), np.float32(sigma * alpha_t)

    @staticmethod
    def _lambda(alpha, sigma):
        with np.errstate(divide="ignore"):  # sigma 0 at the end: lambda = +inf, exp(-h) = 0 as in torch
            return np.float32(np.log(alpha)) - np.float32(np.log(sigma))

    def step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        sample = np.asarray(sample, np.float32)
        model_output = np.asarray(model_output, np.float32)
        i = step_index
        if i == 0:
            self._outputs = []
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        else:  # v_prediction
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        x0 = x0.astype(np.float32)
        self._outputs = (self._outputs + [x0])[-2:]
        n = len(self.timesteps)
        lower_order_final = i == n - 1  # final_sigmas_type zero: the last step is always first order
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        lambda_t, lambda_s0 = self._lambda(alpha_t, sigma_t), self._lambda(alpha_s0, sigma_s0)
        h = np.float32(lambda_t - lambda_s0)
        phi = np.float32(np.exp(-h) - np.float32(1.0))
        if i == 0 or lower_order_final or len(self._outputs) < 2:
            prev = (sigma_t / sigma_s0) * sample - (alpha_t * phi) * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            h_0 = np.float32(lambda_s0 - self._lambda(alpha_s1, sigma_s1))
            r0 = np.float32(h_0 / h)
            m0, m1 = self._outputs[-1], self._outputs[-2]
            d1 = (np.float32(1.0) / r0) * (m0 - m1)
            prev = (sigma_t / sigma_s0) * sample - (alpha_t * phi) * m0 - np.float32(0.5) * (alpha_t * phi) * d1
        return np.asarray(prev, np.float32)


SCHEDULERS = {"euler": EulerDiscreteScheduler, "k_euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "k_euler_a": EulerAncestralDiscreteScheduler,
              "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}
# kohya's sampler names (get_my_scheduler); the ones not in SCHEDULERS stop with a clear message
KOHYA_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                  "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")

# diffusers' class defaults of the keys that differ between the classes: what kohya's get_my_scheduler
# gets by constructing each class with only the betas (and prediction_type), plus its forced clip_sample
_KOHYA_CLASS_DEFAULTS = {
    EulerDiscreteScheduler: dict(timestep_spacing="linspace", steps_offset=0),
    EulerAncestralDiscreteScheduler: dict(timestep_spacing="linspace", steps_offset=0),
    DDIMScheduler: dict(timestep_spacing="leading", steps_offset=0, clip_sample=True, set_alpha_to_one=True,
                        clip_sample_range=1.0),
    DPMSolverMultistepScheduler: dict(timestep_spacing="linspace", steps_offset=0, algorithm_type="dpmsolver++",
                                      solver_order=2),
}


def check_sampler_name(name: str, option: str = "--sampler") -> str:
    """The lower-cased sampler name, or a UserError listing the supported ones."""
    key = str(name).lower()
    if key not in SCHEDULERS:
        known = " (a kohya sampler not implemented in this port)" if key in KOHYA_SAMPLERS else ""
        raise UserError(f"{option} {name}{known}: supported samplers are {', '.join(SCHEDULERS)}")
    return key


def _construct(cls, config):
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(**{k: v for k, v in config.items() if k in accepted})


def get_scheduler(name: str, **overrides):
    """Scheduler for a sampler name with SDXL's scheduler config (inference); a clear error for any other."""
    cls = SCHEDULERS[check_sampler_name(name)]
    return _construct(cls, {**SDXL_SCHEDULER_CONFIG, **overrides})


def get_kohya_scheduler(sample_sampler: str, v_parameterization: bool = False, option: str = "--sample_sampler"):
    """kohya's ``get_my_scheduler`` for training samples: the diffusers class for the name with SDXL's betas
    (0.00085..0.012 scaled_linear, 1000 steps), the class's own defaults otherwise, ``clip_sample`` True
    (DDIM), ``v_prediction`` with ``--v_parameterization``."""
    cls = SCHEDULERS[check_sampler_name(sample_sampler, option)]
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction" if v_parameterization else "epsilon")
    config.update(_KOHYA_CLASS_DEFAULTS[cls])
    return _construct(cls, config)
