"""Samplers for SDXL inference and training samples, in numpy (the step is cheap; the U-Net runs in graph mode):
all 16 of kohya's sampler names (``SCHEDULERS``).

Each class follows the diffusers (0.35.2) class of the same name: the same timesteps, ``init_noise_sigma``,
``scale_model_input`` and ``step`` arithmetic, in float32 where diffusers computes in float32.

- ``EulerDiscreteScheduler`` (``euler``, ``k_euler``) and ``EulerAncestralDiscreteScheduler``
  (``euler_a``, ``k_euler_a``): sigma space; the model input is divided by ``sqrt(sigma^2 + 1)``.
- ``DDIMScheduler`` (``ddim``): deterministic DDIM (eta 0, as kohya's pipeline calls it).
- ``library.sdxl_schedulers_k``: ``LMSDiscreteScheduler`` (``lms``, ``k_lms``), ``HeunDiscreteScheduler``
  (``heun``), ``KDPM2DiscreteScheduler`` (``dpm_2``, ``k_dpm_2``), ``KDPM2AncestralDiscreteScheduler``
  (``dpm_2_a``, ``k_dpm_2_a``), in sigma space.
- ``library.sdxl_schedulers_multistep``: ``DPMSolverMultistepScheduler`` (``dpmsolver++``; DPM-Solver++ 2M,
  diffusers' defaults), ``DPMSolverScheduler`` (``dpmsolver``: the same class with ``algorithm_type``
  dpmsolver, as kohya asks, and ``final_sigmas_type`` sigma_min, see there), ``DPMSolverSinglestepScheduler``
  (``dpmsingle``) and ``PNDMScheduler`` (``pndm``), in alpha space: their model input is not scaled
  (``input_scale`` 1) and ``init_noise_sigma`` is 1, as DDIM's.

Every class has the same interface, which ``Generator.sample`` uses: ``set_timesteps(n)``, ``timesteps``
(diffusers' list: one entry per model evaluation, so longer than ``n`` for the second-order Heun/KDPM2
samplers and PNDM), ``init_noise_sigma``, ``input_scale(i)`` (the divisor of ``scale_model_input``,
applied inside the compiled U-Net step), ``scale_model_input(sample, i)`` and
``step(model_output, i, sample, rng)`` with ``i`` the position in ``timesteps``; the samplers that keep
state need the steps in order from 0. ``prediction_type`` epsilon or v_prediction. The ancestral samplers
(euler_a, dpm_2_a) draw their noise from the numpy generator ``rng``.

Two configurations: ``SDXL_SCHEDULER_CONFIG`` (SDXL's ``scheduler_config.json``: leading spacing,
``steps_offset`` 1, DDIM and Heun without clipping, ``set_alpha_to_one`` False, PNDM's
``skip_prk_steps``), which ``sdxl_minimal_inference.py`` uses (``get_scheduler``), and kohya's
``get_my_scheduler`` for training samples (``get_kohya_scheduler``): each diffusers class's own defaults
with SDXL's betas, and ``clip_sample`` forced on where the class has it (DDIM, Heun), exactly what kohya
constructs.
"""
import inspect
from typing import Optional

import numpy as np

from library.device_utils import UserError
from library.sdxl_schedulers_base import (PREDICTION_TYPES, SDXL_SCHEDULER_CONFIG, TIMESTEP_SPACINGS,  # noqa: F401
                                          _Scheduler, _SigmaScheduler, scaled_linear_alphas_cumprod)
from library.sdxl_schedulers_k import (HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                                       KDPM2DiscreteScheduler, LMSDiscreteScheduler)
from library.sdxl_schedulers_multistep import (DPMSolverMultistepScheduler, DPMSolverScheduler,
                                               DPMSolverSinglestepScheduler, PNDMScheduler)


class EulerDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``EulerDiscreteScheduler`` (no churn, no Karras sigmas, linear interpolation)."""

    name = "euler"

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        """One Euler step from ``sigmas[i]`` to ``sigmas[i+1]`` (float32)."""
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

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        if rng is None:
            raise ValueError("euler_a needs a random generator for its noise")
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
        n = self._check_steps(num_inference_steps)
        self.timesteps = self._spaced_timesteps(n).astype(np.int64)
        self.num_inference_steps = n
        return self.timesteps

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
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


SCHEDULERS = {"euler": EulerDiscreteScheduler, "k_euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "k_euler_a": EulerAncestralDiscreteScheduler,
              "ddim": DDIMScheduler,
              "dpmsolver++": DPMSolverMultistepScheduler,
              "dpmsolver": DPMSolverScheduler,
              "dpmsingle": DPMSolverSinglestepScheduler,
              "pndm": PNDMScheduler,
              "lms": LMSDiscreteScheduler, "k_lms": LMSDiscreteScheduler,
              "heun": HeunDiscreteScheduler,
              "dpm_2": KDPM2DiscreteScheduler, "k_dpm_2": KDPM2DiscreteScheduler,
              "dpm_2_a": KDPM2AncestralDiscreteScheduler, "k_dpm_2_a": KDPM2AncestralDiscreteScheduler}
# kohya's sampler names (get_my_scheduler's options; it sends any other name to DDIM, here that is an error)
KOHYA_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                  "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")

# diffusers' class defaults of the keys that differ between the classes: what kohya's get_my_scheduler
# gets by constructing each class with only the betas (and prediction_type, and algorithm_type for the
# dpmsolver names), plus its forced clip_sample (DDIM, Heun: the classes with that config key)
_SIGMA_CLASS_DEFAULTS = dict(timestep_spacing="linspace", steps_offset=0)
_KOHYA_CLASS_DEFAULTS = {
    EulerDiscreteScheduler: _SIGMA_CLASS_DEFAULTS,
    EulerAncestralDiscreteScheduler: _SIGMA_CLASS_DEFAULTS,
    DDIMScheduler: dict(timestep_spacing="leading", steps_offset=0, clip_sample=True, set_alpha_to_one=True,
                        clip_sample_range=1.0),
    DPMSolverMultistepScheduler: dict(_SIGMA_CLASS_DEFAULTS, algorithm_type="dpmsolver++", solver_order=2,
                                      final_sigmas_type="zero"),
    DPMSolverScheduler: dict(_SIGMA_CLASS_DEFAULTS, algorithm_type="dpmsolver", solver_order=2,
                             final_sigmas_type="sigma_min"),
    DPMSolverSinglestepScheduler: dict(algorithm_type="dpmsolver++", solver_order=2),
    PNDMScheduler: dict(timestep_spacing="leading", steps_offset=0, skip_prk_steps=False, set_alpha_to_one=False),
    LMSDiscreteScheduler: _SIGMA_CLASS_DEFAULTS,
    HeunDiscreteScheduler: dict(_SIGMA_CLASS_DEFAULTS, clip_sample=True, clip_sample_range=1.0),
    KDPM2DiscreteScheduler: _SIGMA_CLASS_DEFAULTS,
    KDPM2AncestralDiscreteScheduler: _SIGMA_CLASS_DEFAULTS,
}


def check_sampler_name(name: str, option: str = "--sampler") -> str:
    """The lower-cased sampler name, or a UserError listing the supported ones."""
    key = str(name).lower()
    if key not in SCHEDULERS:
        raise UserError(f"{option} {name}: supported samplers are {', '.join(SCHEDULERS)}")
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
    (DDIM, Heun), ``v_prediction`` with ``--v_parameterization``."""
    cls = SCHEDULERS[check_sampler_name(sample_sampler, option)]
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction" if v_parameterization else "epsilon")
    config.update(_KOHYA_CLASS_DEFAULTS[cls])
    return _construct(cls, config)
