"""The alpha-space samplers that keep earlier model outputs, each following its diffusers 0.35.2 class:
``DPMSolverMultistepScheduler`` (``dpmsolver++``; ``dpmsolver`` as ``DPMSolverScheduler``),
``DPMSolverSinglestepScheduler`` (``dpmsingle``) and ``PNDMScheduler`` (``pndm``).

Their model input is not scaled and ``init_noise_sigma`` is 1. Each keeps a history, reset by
``set_timesteps`` and at step index 0: ``step`` must be called for i = 0, 1, ... in order. PNDM's
``timesteps`` list is longer than the number of steps (its Runge-Kutta warm-up evaluates the model four
times per step); ``i`` is the position in that list, as for every sampler here.

Registered in ``library.sdxl_schedulers`` (import them from there).
"""
from typing import Optional

import numpy as np

from library.device_utils import UserError
from library.sdxl_schedulers_base import _Scheduler


def _alpha_sigma(sigma):
    """diffusers' ``_sigma_to_alpha_sigma_t`` in float32: alpha_t = 1/sqrt(sigma^2+1), sigma_t = sigma alpha_t."""
    alpha_t = np.float32(1) / ((sigma ** 2 + np.float32(1)) ** np.float32(0.5))
    return np.float32(alpha_t), np.float32(sigma * alpha_t)


def _lambda(alpha, sigma):
    with np.errstate(divide="ignore"):  # sigma 0 at the end: lambda = +inf, exp(-h) = 0 as in torch
        return np.float32(np.log(alpha)) - np.float32(np.log(sigma))


class _DPMSolverBase(_Scheduler):
    """Shared by the DPM-Solver classes: the sigmas of the training schedule, the model output converted to
    what the solver integrates (the data prediction x0 for dpmsolver++, the noise for dpmsolver) and the
    first-order update."""

    def __init__(self, num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                 prediction_type, algorithm_type):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type)
        self.algorithm_type = algorithm_type
        self.train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).astype(np.float32)
        self.sigmas = None

    def _convert(self, model_output, sample, i):
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i])
        if self.algorithm_type == "dpmsolver++":
            if self.prediction_type == "epsilon":
                return ((sample - sigma_t * model_output) / alpha_t).astype(np.float32)
            return (alpha_t * sample - sigma_t * model_output).astype(np.float32)  # v_prediction
        if self.prediction_type == "epsilon":  # dpmsolver: the noise prediction
            return model_output
        return (alpha_t * model_output + sigma_t * sample).astype(np.float32)

    def _first_order(self, m, sample, sigma_s, sigma_t):
        alpha_t, sigma_t = _alpha_sigma(sigma_t)
        alpha_s, sigma_s = _alpha_sigma(sigma_s)
        h = np.float32(_lambda(alpha_t, sigma_t) - _lambda(alpha_s, sigma_s))
        if self.algorithm_type == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * np.float32(np.exp(-h) - np.float32(1))) * m
        return (alpha_t / alpha_s) * sample - (sigma_t * np.float32(np.exp(h) - np.float32(1))) * m

    def _second_order(self, m0, m1, sample, sigma_s1, sigma_s0, sigma_t, h_from_s1):
        """Midpoint second-order update: from ``sigma_s0`` (multistep) or ``sigma_s1`` (singlestep,
        ``h_from_s1``) to ``sigma_t`` with outputs m0 (at s0) and m1 (at s1)."""
        alpha_t, sigma_t = _alpha_sigma(sigma_t)
        alpha_s0, sigma_s0 = _alpha_sigma(sigma_s0)
        alpha_s1, sigma_s1 = _alpha_sigma(sigma_s1)
        lambda_t, lambda_s0, lambda_s1 = (_lambda(alpha_t, sigma_t), _lambda(alpha_s0, sigma_s0),
                                          _lambda(alpha_s1, sigma_s1))
        if h_from_s1:  # singlestep: the step starts at s1; D0 = m1
            h, h_0 = np.float32(lambda_t - lambda_s1), np.float32(lambda_s0 - lambda_s1)
            alpha_s, sigma_s, d0 = alpha_s1, sigma_s1, m1
        else:  # multistep: the step starts at s0; D0 = m0
            h, h_0 = np.float32(lambda_t - lambda_s0), np.float32(lambda_s0 - lambda_s1)
            alpha_s, sigma_s, d0 = alpha_s0, sigma_s0, m0
        r0 = np.float32(h_0 / h)
        d1 = (np.float32(1.0) / r0) * (m0 - m1)
        if self.algorithm_type == "dpmsolver++":
            phi = alpha_t * np.float32(np.exp(-h) - np.float32(1))
            return (sigma_t / sigma_s) * sample - phi * d0 - np.float32(0.5) * phi * d1
        phi = sigma_t * np.float32(np.exp(h) - np.float32(1))
        return (alpha_t / alpha_s) * sample - phi * d0 - np.float32(0.5) * phi * d1


class DPMSolverMultistepScheduler(_DPMSolverBase):
    """diffusers' ``DPMSolverMultistepScheduler`` with ``solver_order`` 2, ``solver_type`` midpoint,
    ``lower_order_final`` True, ``euler_at_final`` False, no thresholding, no Karras/Lu/exponential sigmas
    (diffusers' defaults). ``algorithm_type`` dpmsolver++ (kohya's ``dpmsolver++``, ``final_sigmas_type``
    zero) or dpmsolver (``DPMSolverScheduler``).

    First step first order, the others second-order multistep from the last two converted outputs; the last
    step is first order when it goes to sigma 0 (``final_sigmas_type`` zero) or, with ``sigma_min``, when
    there are fewer than 15 steps (diffusers' ``lower_order_final``).
    """

    name = "dpmsolver++"

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon", algorithm_type="dpmsolver++",
                 solver_order=2, final_sigmas_type="zero"):
        if algorithm_type not in ("dpmsolver++", "dpmsolver") or solver_order != 2:
            raise UserError(f"DPM-Solver: only algorithm_type dpmsolver++ or dpmsolver with solver_order 2 is "
                            f"implemented (got {algorithm_type}, order {solver_order})")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise UserError(f"DPM-Solver: final_sigmas_type '{final_sigmas_type}' is not zero or sigma_min")
        if algorithm_type == "dpmsolver" and final_sigmas_type == "zero":  # diffusers refuses it the same way
            raise UserError("DPM-Solver: final_sigmas_type zero is not supported for algorithm_type dpmsolver "
                            "(diffusers: choose sigma_min)")
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type, algorithm_type)
        self.final_sigmas_type = final_sigmas_type
        self._outputs = []

    def set_timesteps(self, num_inference_steps: int):
        n, n_train = self._check_steps(num_inference_steps), self.num_train_timesteps
        # lambda_min_clipped -inf: linspace and leading space n + 1 points and drop the last
        timesteps = self._spaced_timesteps(n, spaced_over=n + 1).astype(np.int64)
        sigmas = np.interp(timesteps, np.arange(0, n_train), self.train_sigmas)
        sigma_last = self.train_sigmas[0] if self.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps
        self.num_inference_steps = len(timesteps)
        self._outputs = []
        return self.timesteps

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        i = step_index
        if i == 0:
            self._outputs = []
        n = len(self.timesteps)
        lower_order_final = i == n - 1 and (n < 15 or self.final_sigmas_type == "zero")
        self._outputs = (self._outputs + [self._convert(model_output, sample, i)])[-2:]
        if i == 0 or lower_order_final or len(self._outputs) < 2:
            prev = self._first_order(self._outputs[-1], sample, self.sigmas[i], self.sigmas[i + 1])
        else:
            prev = self._second_order(self._outputs[-1], self._outputs[-2], sample, self.sigmas[i - 1],
                                      self.sigmas[i], self.sigmas[i + 1], h_from_s1=False)
        return np.asarray(prev, np.float32)


class DPMSolverScheduler(DPMSolverMultistepScheduler):
    """kohya's ``dpmsolver``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver")`` (DPM-Solver-2M on the
    noise prediction). diffusers (0.32.1, kohya's pin, and 0.35.2) refuses that with its default
    ``final_sigmas_type`` zero, so kohya's own ``--sample_sampler dpmsolver`` stops with a ValueError; here
    it runs with ``final_sigmas_type`` sigma_min, the value diffusers' message asks for (the last step ends
    at the smallest training sigma, not 0)."""

    name = "dpmsolver"

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon", algorithm_type="dpmsolver",
                 solver_order=2, final_sigmas_type="sigma_min"):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type, algorithm_type, solver_order, final_sigmas_type)


class DPMSolverSinglestepScheduler(_DPMSolverBase):
    """diffusers' ``DPMSolverSinglestepScheduler`` with its defaults (kohya's ``dpmsingle``): dpmsolver++,
    ``solver_order`` 2, midpoint, ``final_sigmas_type`` zero (which makes diffusers turn
    ``lower_order_final`` on). Steps go in pairs: a first-order step from sigma_s1 to sigma_s0 (the sample
    is kept), then a second-order step from the kept sample at s1 straight to the next sigma using both
    outputs. Order list ``[1, 2] * (n // 2 - 1) + [1, 1]`` (n even) or ``[1, 2] * (n // 2) + [1]``.

    diffusers' class has no ``timestep_spacing``: the timesteps are ``linspace(0, 999, n + 1)`` rounded,
    largest first, without the last."""

    name = "dpmsingle"

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2):
        if algorithm_type != "dpmsolver++" or solver_order != 2:
            raise UserError(f"DPM-Solver singlestep: only algorithm_type dpmsolver++ with solver_order 2 is "
                            f"implemented (got {algorithm_type}, order {solver_order})")
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, "linspace", 0, prediction_type,
                         algorithm_type)
        self._outputs = [None, None]
        self._kept = None
        self.order_list = None

    def set_timesteps(self, num_inference_steps: int):
        n, n_train = self._check_steps(num_inference_steps), self.num_train_timesteps
        self.timesteps = np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        sigmas = np.interp(self.timesteps, np.arange(0, n_train), self.train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.num_inference_steps = n
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
        orders[-1] = 1  # final_sigmas_type zero
        self.order_list = orders
        self._outputs, self._kept = [None, None], None
        return self.timesteps

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        i = step_index
        if i == 0:
            self._outputs, self._kept = [None, None], None
        self._outputs = [self._outputs[1], self._convert(model_output, sample, i)]
        order = self.order_list[i]
        while self._outputs[-order] is None:
            order -= 1
        if order == 1:
            self._kept = sample
            prev = self._first_order(self._outputs[-1], self._kept, self.sigmas[i], self.sigmas[i + 1])
        else:
            prev = self._second_order(self._outputs[-1], self._outputs[-2], self._kept, self.sigmas[i - 1],
                                      self.sigmas[i], self.sigmas[i + 1], h_from_s1=True)
        return np.asarray(prev, np.float32)


class PNDMScheduler(_Scheduler):
    """diffusers' ``PNDMScheduler`` (pseudo linear multistep). Without ``skip_prk_steps`` (the class default,
    kohya's ``pndm``) the last 4 of the n timesteps (the noisiest) are a Runge-Kutta warm-up of 3 steps with
    4 model evaluations each (12 entries, halfway timesteps included), then n - 3 linear multistep (PLMS)
    steps: ``n + 9`` evaluations, and at least 4 steps are needed. With ``skip_prk_steps`` (SDXL's
    scheduler config) the first PLMS step is evaluated twice (a second-order start): ``n + 1`` evaluations.

    The step itself is DDIM-like in alpha space (``_prev_sample``); ``set_alpha_to_one`` as DDIM's."""

    name = "pndm"

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, prediction_type="epsilon", skip_prk_steps=False,
                 set_alpha_to_one=False):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing, steps_offset,
                         prediction_type)
        self.skip_prk_steps = bool(skip_prk_steps)
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps = None
        self._reset()

    def _reset(self):
        self._counter, self._ets, self._cur_sample, self._cur_model_output = 0, [], None, None

    def set_timesteps(self, num_inference_steps: int):
        n, n_train = self._check_steps(num_inference_steps), self.num_train_timesteps
        if not self.skip_prk_steps and n < 4:  # diffusers fails with a broadcasting error there
            raise UserError(f"pndm needs at least 4 steps (its Runge-Kutta warm-up takes the last 4), not {n}")
        if self.timestep_spacing == "linspace":
            base = np.linspace(0, n_train - 1, n).round().astype(np.int64)
        elif self.timestep_spacing == "leading":
            base = (np.arange(0, n) * (n_train // n)).round() + self.steps_offset
        else:  # trailing
            base = np.round(np.arange(n_train, 0, -n_train / n))[::-1].astype(np.int64) - 1
        if self.skip_prk_steps:
            self.prk_timesteps = np.array([], np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, n_train // n // 2]), 4)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = base[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self.num_inference_steps = n
        self._reset()
        return self.timesteps

    def _step(self, model_output, step_index: int, sample, rng: Optional[np.random.Generator] = None):
        if step_index == 0:
            self._reset()
        timestep = int(self.timesteps[step_index])
        if self._counter < len(self.prk_timesteps) and not self.skip_prk_steps:
            prev = self._step_prk(model_output, timestep, sample)
        else:
            prev = self._step_plms(model_output, timestep, sample)
        self._counter += 1
        return prev.astype(np.float32)

    def _step_prk(self, model_output, timestep, sample):
        """Runge-Kutta (4 evaluations per step: weights 1/6, 1/3, 1/3, 1/6), each from the step's start."""
        c = self._counter
        half = self.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = timestep - (0 if c % 2 else half)
        timestep = int(self.prk_timesteps[c // 4 * 4])
        if c % 4 == 0:
            self._cur_model_output = np.float32(1 / 6) * model_output
            self._ets.append(model_output)
            self._cur_sample = sample
        elif c % 4 in (1, 2):
            self._cur_model_output = self._cur_model_output + np.float32(1 / 3) * model_output
        else:
            model_output = self._cur_model_output + np.float32(1 / 6) * model_output
            self._cur_model_output = None
        cur_sample = self._cur_sample if self._cur_sample is not None else sample
        return self._prev_sample(cur_sample, timestep, prev_timestep, model_output)

    def _step_plms(self, model_output, timestep, sample):
        """Linear multistep on the last (up to 4) outputs (Adams-Bashforth weights)."""
        ratio = self.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - ratio
        if self._counter != 1:
            self._ets = self._ets[-3:] + [model_output]
        else:  # skip_prk_steps' second evaluation: the first step again, with the outputs' average
            prev_timestep, timestep = timestep, timestep + ratio
        ets = self._ets
        if len(ets) == 1 and self._counter == 0:
            self._cur_sample = sample
        elif len(ets) == 1 and self._counter == 1:
            model_output = (model_output + ets[-1]) / np.float32(2)
            sample, self._cur_sample = self._cur_sample, None
        elif len(ets) == 2:
            model_output = (np.float32(3) * ets[-1] - ets[-2]) / np.float32(2)
        elif len(ets) == 3:
            model_output = (np.float32(23) * ets[-1] - np.float32(16) * ets[-2] + np.float32(5) * ets[-3]) \
                / np.float32(12)
        else:
            model_output = np.float32(1 / 24) * (np.float32(55) * ets[-1] - np.float32(59) * ets[-2]
                                                 + np.float32(37) * ets[-3] - np.float32(9) * ets[-4])
        return self._prev_sample(sample, timestep, prev_timestep, model_output)

    def _prev_sample(self, sample, timestep, prev_timestep, model_output):
        """PNDM's transfer (formula 9 of the paper) from ``timestep`` to ``prev_timestep``, float32."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = np.float32(1) - alpha_prod_t
        beta_prod_t_prev = np.float32(1) - alpha_prod_t_prev
        if self.prediction_type == "v_prediction":
            model_output = alpha_prod_t ** np.float32(0.5) * model_output + beta_prod_t ** np.float32(0.5) * sample
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** np.float32(0.5)
        denom = alpha_prod_t * beta_prod_t_prev ** np.float32(0.5) \
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** np.float32(0.5)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom
