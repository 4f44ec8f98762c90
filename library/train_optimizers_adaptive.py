"""The adaptive optimizers LoRA trainers pick, as graph-mode cells of ``library.train_optimizers``' protocol.

Each reproduces the update rule of the package kohya's ``get_optimizer`` takes it from (the versions
kohya's requirements pin; the parity tests run against them):

- ``CAME``: pytorch_optimizer 3.9.0's ``CAME`` (kohya users name it ``pytorch_optimizer.CAME``; kohya
  requires pytorch-optimizer, not came-pytorch). Factored second moments and factored "confidence"
  (residual) moments for 2+-dim parameters, full ones for the others.
- ``Prodigy``: prodigyopt 1.1.2's ``Prodigy`` (kohya's ``Prodigy``).
- ``DAdaptAdam``: dadaptation 3.2's ``DAdaptAdam`` (kohya's ``DAdaptAdam``).
- ``AdamWScheduleFree``: schedulefree 1.4.1's ``AdamWScheduleFree`` (kohya's ``AdamWScheduleFree``).

Prodigy and D-Adaptation need sums over all parameters (the distance estimate d) between the moments'
update and the parameters' update, so their step has two phases (``TwoPhaseOptimizer``):
``accumulate_fn`` per parameter (moments, and this parameter's contributions to the sums, returned as
a small vector), ``finish(sums)`` once (the new d and the other step values, kept in scalar state
Parameters that resume saves), then ``update_fn`` per parameter. ``construct`` runs the three in one
graph; ``library.train_step.ParameterwiseUpdate`` runs them as chunk graphs, a reduction graph between.

All per-parameter choices that depend on a value (a group's lr being 0, the reference returning early
when the sums are 0) are made by multiplying with 0/1 flags, which is exact for finite values, so that
no graph branches on a tensor.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from library.device_utils import UserError
from library.train_optimizers import GroupedOptimizer

CAME_DEFAULTS = dict(betas=(0.9, 0.999, 0.9999), weight_decay=0.0, weight_decouple=True, fixed_decay=False,
                     clip_threshold=1.0, ams_bound=False, eps1=1e-30, eps2=1e-16, maximize=False)
PRODIGY_DEFAULTS = dict(betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
                        use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0,
                        growth_rate=float("inf"), fsdp_in_use=False, slice_p=1)
DADAPT_ADAM_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, log_every=0, decouple=False,
                            use_bias_correction=False, d0=1e-6, growth_rate=float("inf"), fsdp_in_use=False)
SCHEDULE_FREE_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                              weight_lr_power=2.0, foreach=True)


def _f32(x):
    return Tensor(np.float32(x))


def _flag(cond):
    """A 0-d bool tensor as a 0/1 float32 multiplier."""
    return ops.cast(cond, ms.float32)


def _blend(flag, new, old):
    """``new`` where flag is 1, ``old`` where 0 (exact for finite values)."""
    return new * flag + old * (1.0 - flag)


def _one_minus_pow(log_beta, n):
    """1 - beta^n as -expm1(n log beta), ``log_beta`` from float64: 1 - fp32(0.999)^n is 1e-5 off, and so is
    MindSpore's CPU expm1 (exp(x) - 1); Kahan's expm1(x) = (u - 1) x / log(u), u = exp(x), is exact to a
    few ulps (x itself where u rounds to 1)."""
    x = n * log_beta
    u = ops.exp(x)
    near_one = _flag(ops.equal(u, 1.0))
    return -_blend(near_one, x, (u - 1.0) * x / (ops.log(u) + near_one))


def _bias_correction(opt):
    """sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1)) of Prodigy / D-Adaptation's use_bias_correction."""
    return ops.sqrt(_one_minus_pow(opt.log_beta2, opt.k + 1.0)) / _one_minus_pow(opt.log_beta1, opt.k + 1.0)


def _betas(opt, beta1, beta2):
    """The betas as float32 constants, with their complements and logs taken in float64 first."""
    beta1, beta2 = float(beta1), float(beta2)
    opt.beta1, opt.beta2 = _f32(beta1), _f32(beta2)
    opt.om1, opt.om2 = _f32(1.0 - beta1), _f32(1.0 - beta2)
    opt.log_beta1 = _f32(np.log(beta1) if beta1 > 0 else -np.inf)
    opt.log_beta2 = _f32(np.log(beta2) if beta2 > 0 else -np.inf)


def _rms(x):
    return ops.sqrt(ops.mean(ops.square(x)))


def _scalar_state(opt, name, value):
    p = Parameter(Tensor(np.float32(value)), name=f"optimizer_{name}", requires_grad=False)
    opt._state.append(p)
    return p


def _check_same_lrs(name, lrs):
    """prodigyopt / dadaptation raise at their first step when groups have different non-zero lrs."""
    top = max(lrs)
    if any(lr not in (top, 0.0) for lr in lrs):
        raise UserError(f"{name} takes one learning rate for all parameter groups (or 0 for a frozen group), got "
                        f"{sorted(set(lrs))} (--unet_lr / --text_encoder_lr / block lrs): the reference raises at its "
                        "first step; give one --learning_rate")


# -- CAME ------------------------------------------------------------------------------------------

class CAME(GroupedOptimizer):
    """pytorch_optimizer's CAME. For 2+-dim parameters: r/c = EMAs (beta2) of the row/column means of
    g^2 + eps1, u = g / sqrt(r c / mean(r)) clipped to RMS clip_threshold, m = EMA (beta1) of u, and the
    confidence EMAs (beta3) of the row/column means of (u - m)^2 + eps2 scale m into the update. For the
    others: u = g / sqrt(v), and the update is m itself; the reference then scales its stored m by lr in
    place (``update = exp_avg; update.mul_(lr)``), and so does this cell (parity). Decoupled weight decay
    p *= 1 - wd lr (or 1 - wd with fixed_decay); with weight_decouple=False the reference adds the decay
    to the gradient after the update was computed, i.e. it has no effect, as here.

    States per parameter: exp_avg, then (row, col, res_row, res_col) for factored parameters or (v and
    three 1-element placeholders outside ``state_parameters``) for the others; with ams_bound a last
    exp_avg_sq_hat."""

    def __init__(self, params, group_of, lrs, betas=(0.9, 0.999, 0.9999), weight_decay=0.0, weight_decouple=True,
                 fixed_decay=False, clip_threshold=1.0, ams_bound=False, eps1=1e-30, eps2=1e-16, maximize=False):
        super().__init__(params, group_of, lrs)
        self.exp_avg = self._zeros("exp_avg")
        self.row = self._factored("exp_avg_sq_row", lambda s: s[:-1], "exp_avg_sq")
        self.col = self._factored("exp_avg_sq_col", lambda s: s[:-2] + s[-1:])
        self.res_row = self._factored("exp_avg_res_row", lambda s: s[:-1])
        self.res_col = self._factored("exp_avg_res_col", lambda s: s[:-2] + s[-1:])
        self.ams_bound = bool(ams_bound)
        self.hat = self._zeros("exp_avg_sq_hat") if self.ams_bound else None
        self.betas = tuple(_f32(b) for b in betas)
        self.one_minus = tuple(_f32(1.0 - float(b)) for b in betas)  # in float64 first: 1 - fp32(0.9999) is 2e-5 off
        self.eps1, self.eps2, self.clip = _f32(eps1), _f32(eps2), _f32(clip_threshold)
        self.wd = _f32(weight_decay if weight_decouple else 0.0)
        self.fixed = _f32(1.0 if fixed_decay else 0.0)
        self.sign = _f32(-1.0 if maximize else 1.0)
        self.update_fn = _came_ams_update if self.ams_bound else _came_update

    def _factored(self, prefix, shape_fn, full_name=None):
        """A factored statistic for 2+-dim parameters; for the others the full one (``full_name``) or a
        1-element placeholder outside the state."""
        def choose(shape):
            if len(shape) >= 2:
                return prefix, shape_fn(shape)
            return (full_name, shape) if full_name is not None else (prefix, None)

        return self._per_param(choose)

    def step_scalars(self, step):
        return (self.betas[0], self.betas[1], self.betas[2], self.one_minus[0], self.one_minus[1], self.one_minus[2],
                self.eps1, self.eps2, self.clip, self.wd, self.fixed, self.sign)

    def per_param_states(self):
        states = (self.exp_avg, self.row, self.col, self.res_row, self.res_col)
        return states + (self.hat,) if self.ams_bound else states

    def construct(self, grads):
        s = self.step_scalars(self._next_step())
        lrs = self._param_lrs()
        out = ()
        for i in range(len(self.params)):
            if self.ams_bound:
                r = _came_ams_update(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11],
                                     lrs[i], self.params[i],
                                     self.exp_avg[i], self.row[i], self.col[i], self.res_row[i], self.res_col[i],
                                     self.hat[i], grads[i])
            else:
                r = _came_update(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11], lrs[i],
                                 self.params[i],
                                 self.exp_avg[i], self.row[i], self.col[i], self.res_row[i], self.res_col[i], grads[i])
            out = out + (r,)
        return out


def _approx_rsqrt(row, col):
    """Adafactor's factored 1/sqrt of the second moment (shape row.shape + col.shape[-1:])."""
    r = ops.expand_dims(ops.rsqrt(row / ops.mean(row, -1, keep_dims=True)), -1)
    c = ops.expand_dims(ops.rsqrt(col), -2)
    return r * c


def _came(beta1, beta2, beta3, om1, om2, om3, eps1, eps2, clip, wd, fixed, sign, lr, param, m, row, col, res_row,
          res_col, hat,
          grad):
    g = grad.astype(ms.float32) * sign
    p = param.astype(ms.float32)
    sq = ops.square(g) + eps1
    factored = len(g.shape) >= 2
    if factored:
        row_new = row * beta2 + ops.mean(sq, -1) * om2
        col_new = col * beta2 + ops.mean(sq, -2) * om2
        ops.assign(row, row_new)
        ops.assign(col, col_new)
        u = _approx_rsqrt(row_new, col_new)
    else:
        v_new = row * beta2 + sq * om2  # the full second moment lives in the row slot
        ops.assign(row, v_new)
        u = ops.rsqrt(v_new)
    if hat is not None:
        hat_new = ops.maximum(hat, 1.0 / u)
        ops.assign(hat, hat_new)
        u = ops.rsqrt(hat_new / beta2)
    u = u * g
    u = u / ops.maximum(_rms(u) / clip, 1.0)
    m_new = m * beta1 + u * om1
    if factored:
        res = ops.square(u - m_new) + eps2
        res_row_new = res_row * beta3 + ops.mean(res, -1) * om3
        res_col_new = res_col * beta3 + ops.mean(res, -2) * om3
        ops.assign(res_row, res_row_new)
        ops.assign(res_col, res_col_new)
        update = _approx_rsqrt(res_row_new, res_col_new) * m_new * lr
        ops.assign(m, m_new)
    else:
        update = m_new * lr
        ops.assign(m, update)  # the reference's update aliases exp_avg: its in-place ``* lr`` stays in the state
    p = p * (1.0 - wd * (fixed + (1.0 - fixed) * lr))
    return ops.assign(param, (p - update).astype(param.dtype))


def _came_update(beta1, beta2, beta3, om1, om2, om3, eps1, eps2, clip, wd, fixed, sign, lr, param, m, row, col,
                 res_row, res_col,
                 grad):
    return _came(beta1, beta2, beta3, om1, om2, om3, eps1, eps2, clip, wd, fixed, sign, lr, param, m, row, col,
                 res_row, res_col,
                 None, grad)


def _came_ams_update(beta1, beta2, beta3, om1, om2, om3, eps1, eps2, clip, wd, fixed, sign, lr, param, m, row, col,
                     res_row,
                     res_col, hat, grad):
    return _came(beta1, beta2, beta3, om1, om2, om3, eps1, eps2, clip, wd, fixed, sign, lr, param, m, row, col,
                 res_row, res_col,
                 hat, grad)


# -- Prodigy and D-Adaptation: two phases ---------------------------------------------------------

class TwoPhaseOptimizer(GroupedOptimizer):
    """A step that needs sums over all parameters between the moments' and the parameters' update:
    ``step_scalars(step)`` -> phase-1 values; ``accumulate_fn(*those, lr, param, *states, grad)`` -> this
    parameter's float32 contributions (a vector of ``num_sums``); ``finish(sums)`` -> phase-2 values
    (updating the scalar state); ``update_fn(*those, lr, param, *states, grad)``."""

    num_sums = 2

    def finish(self, sums):
        raise NotImplementedError

    def _dlr(self):
        """(lr: the largest group lr, dlr = d lr, times the bias correction when asked) of this step."""
        lr = ops.reduce_max(self.lrs)
        dlr = self.d * lr
        if self.use_bc:
            dlr = dlr * _bias_correction(self)
        return lr, dlr

    def construct(self, grads):
        s1 = self.step_scalars(self._next_step())
        lrs = self._param_lrs()
        states = self.per_param_states()
        parts = ()
        for i in range(len(self.params)):
            if len(states) == 3:
                parts = parts + (self.accumulate_fn(*s1, lrs[i], self.params[i], states[0][i], states[1][i],
                                                    states[2][i], grads[i]),)
            else:
                parts = parts + (self.accumulate_fn(*s1, lrs[i], self.params[i], states[0][i], states[1][i],
                                                    states[2][i], states[3][i], grads[i]),)
        s2 = self.finish(ops.addn(parts))
        out = ()
        for i in range(len(self.params)):
            if len(states) == 3:
                out = out + (self.update_fn(*s2, lrs[i], self.params[i], states[0][i], states[1][i], states[2][i],
                                            grads[i]),)
            else:
                out = out + (self.update_fn(*s2, lrs[i], self.params[i], states[0][i], states[1][i], states[2][i],
                                            states[3][i], grads[i]),)
        return out


class Prodigy(TwoPhaseOptimizer):
    """prodigyopt's Prodigy (slice_p=1). With dlr = d lr bc (bc = sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))
    with use_bias_correction, else 1) and the d of the last step, phase 1 per parameter (groups with lr 0
    skip it): m = beta1 m + d (1 - beta1) g, v = beta2 v + d^2 (1 - beta2) g^2, s = beta3 s + (d/d0)
    (dlr, or d with safeguard_warmup) g, and the sums (d/d0) dlr <g, p0 - p> and |s|_1 (p0: the
    parameter at the first step). Then d_numerator = beta3 d_numerator + the first sum, d_hat = d_coef
    d_numerator / the second, d = max(d, d_hat) while d is d0, d_max = max(d_max, d_hat), d = min(d_max,
    d growth_rate); phase 2: p -= dlr m / (sqrt(v) + d eps) (decoupled decay p -= wd dlr p first; with
    beta1 = 0, dlr d g instead of dlr m). When the second sum is 0 the reference returns before phase 2,
    and so does this step (flag ``ok``). ``lr`` is the largest group lr; groups take it or 0."""

    def __init__(self, params, group_of, lrs, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0,
                 decouple=True, use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0,
                 growth_rate=float("inf"), fsdp_in_use=False, slice_p=1):
        super().__init__(params, group_of, lrs)
        _check_same_lrs("Prodigy", lrs)
        beta1, beta2 = float(betas[0]), float(betas[1])
        beta3 = float(np.sqrt(beta2)) if beta3 is None else float(beta3)
        self.exp_avg = self._zeros("exp_avg")
        self.exp_avg_sq = self._zeros("exp_avg_sq")
        self.s = self._zeros("s")
        self.p0 = self._zeros("p0")
        self.d = _scalar_state(self, "d", d0)
        self.d_max = _scalar_state(self, "d_max", d0)
        self.d_numerator = _scalar_state(self, "d_numerator", 0.0)
        self.k = _scalar_state(self, "k", 0.0)
        self.d0 = _f32(d0)
        _betas(self, beta1, beta2)
        self.beta3 = _f32(beta3)
        self.use_bc = use_bias_correction
        self.eps, self.d_coef, self.growth = _f32(eps), _f32(d_coef), _f32(growth_rate)
        self.wd_coupled = _f32(0.0 if decouple else weight_decay)
        self.wd_decoupled = _f32(weight_decay if decouple else 0.0)
        self.safeguard = _f32(1.0 if safeguard_warmup else 0.0)
        self.has_m = _f32(1.0 if beta1 > 0 else 0.0)
        self.accumulate_fn = _prodigy_accumulate
        self.update_fn = _prodigy_update

    def step_scalars(self, step):
        _, dlr = self._dlr()
        first = _flag(ops.equal(step, 1.0))  # the reference's state initialisation: p0 = p at the first step
        return (first, self.beta1, self.beta2, self.beta3, self.om1, self.om2, self.d, self.d / self.d0, dlr,
                self.wd_coupled, self.safeguard)

    def per_param_states(self):
        return self.exp_avg, self.exp_avg_sq, self.s, self.p0

    def finish(self, sums):
        lr, dlr = self._dlr()
        d = self.d
        ok = _flag(sums[1] > 0.0)
        numerator = self.d_numerator * self.beta3 + sums[0]
        d_hat = self.d_coef * numerator / ops.maximum(sums[1], 1e-38)
        d_new = _blend(_flag(ops.equal(d, self.d0)), ops.maximum(d, d_hat), d)
        d_max = ops.maximum(self.d_max, d_hat)
        d_new = ops.minimum(d_max, d_new * self.growth)
        has_lr = _flag(lr > 0.0) * ok
        d_new = _blend(has_lr, d_new, d)
        ops.assign(self.d_max, _blend(has_lr, d_max, self.d_max))
        ops.assign(self.d_numerator, _blend(ok, numerator, self.d_numerator))
        ops.assign(self.k, self.k + ok)
        ops.assign(self.d, d_new)
        return ok, d_new, dlr, self.eps, self.wd_decoupled, self.wd_coupled, self.has_m


def _prodigy_accumulate(first, beta1, beta2, beta3, om1, om2, d, d_ratio, dlr, wd_coupled, safeguard, lr, param, m,
                        v, s, p0,
                        grad):
    p = param.astype(ms.float32)
    g = grad.astype(ms.float32) + p * wd_coupled
    on = _flag(lr > 0.0)
    p0_new = _blend(first, p, p0)
    ops.assign(p0, p0_new)
    numerator = d_ratio * dlr * ops.reduce_sum(g * (p0_new - p)) * on
    ops.assign(m, _blend(on, m * beta1 + g * (d * om1), m))
    ops.assign(v, _blend(on, v * beta2 + ops.square(g) * (d * d * om2), v))
    s_new = _blend(on, s * beta3 + g * (d_ratio * _blend(safeguard, d, dlr)), s)
    ops.assign(s, s_new)
    return ops.stack([numerator, ops.reduce_sum(ops.abs(s_new)) * on])


def _prodigy_update(ok, d, dlr, eps, wd_decoupled, wd_coupled, has_m, lr, param, m, v, s, p0, grad):
    p = param.astype(ms.float32)
    denom = ops.sqrt(v) + d * eps
    p_new = p + p * (-wd_decoupled * dlr)
    g = grad.astype(ms.float32) + p * wd_coupled
    p_new = p_new - _blend(has_m, dlr * (m / denom), dlr * d * (g / denom))
    return ops.assign(param, _blend(ok, p_new, p).astype(param.dtype))


class DAdaptAdam(TwoPhaseOptimizer):
    """dadaptation's DAdaptAdam (layer_scale 1). With dlr = d lr bc (bc as Prodigy's) and sb = sqrt(beta2),
    phase 1 per parameter (groups with lr 0 skip it): the sum dlr <g, s / (sqrt(v) + eps)> with the old
    s and v, then m = beta1 m + dlr (1 - beta1) g, v = beta2 v + (1 - beta2) g^2, s = sb s + dlr (1 - sb) g,
    and the sum |s|_1. Then numerator_weighted = sb nw + (1 - sb) first sum, d = max(d, min(nw / ((1 - sb)
    |s|_1), d growth_rate)); phase 2: p -= m / (sqrt(v) + eps) (decoupled decay p -= wd dlr p first; the
    coupled one adds wd p to g). When |s|_1 is 0 the reference returns before storing nw and phase 2."""

    def __init__(self, params, group_of, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, log_every=0,
                 decouple=False, use_bias_correction=False, d0=1e-6, growth_rate=float("inf"), fsdp_in_use=False):
        super().__init__(params, group_of, lrs)
        _check_same_lrs("DAdaptAdam", lrs)
        self.exp_avg = self._zeros("exp_avg")
        self.exp_avg_sq = self._zeros("exp_avg_sq")
        self.s = self._zeros("s")
        self.d = _scalar_state(self, "d", d0)
        self.numerator_weighted = _scalar_state(self, "numerator_weighted", 0.0)
        self.k = _scalar_state(self, "k", 0.0)
        _betas(self, betas[0], betas[1])
        self.sqrt_beta2 = _f32(np.sqrt(float(betas[1])))
        self.om_sqrt_beta2 = _f32(1.0 - np.sqrt(float(betas[1])))
        self.use_bc = use_bias_correction
        self.eps, self.growth = _f32(eps), _f32(growth_rate)
        self.wd_coupled = _f32(0.0 if decouple else weight_decay)
        self.wd_decoupled = _f32(weight_decay if decouple else 0.0)
        self.accumulate_fn = _dadapt_adam_accumulate
        self.update_fn = _dadapt_adam_update

    def step_scalars(self, step):
        _, dlr = self._dlr()
        return self.beta1, self.beta2, self.sqrt_beta2, self.om1, self.om2, self.om_sqrt_beta2, dlr, self.eps, \
            self.wd_coupled

    def per_param_states(self):
        return self.exp_avg, self.exp_avg_sq, self.s

    def finish(self, sums):
        lr, dlr = self._dlr()
        d = self.d
        ok = _flag(sums[1] > 0.0)
        nw = self.numerator_weighted * self.sqrt_beta2 + sums[0] * self.om_sqrt_beta2
        d_hat = nw / (self.om_sqrt_beta2 * ops.maximum(sums[1], 1e-38))
        d_new = _blend(_flag(lr > 0.0) * ok, ops.maximum(d, ops.minimum(d_hat, d * self.growth)), d)
        ops.assign(self.numerator_weighted, _blend(ok, nw, self.numerator_weighted))
        ops.assign(self.k, self.k + ok)
        ops.assign(self.d, d_new)
        return ok, dlr, self.eps, self.wd_decoupled


def _dadapt_adam_accumulate(beta1, beta2, sqrt_beta2, om1, om2, om_sqrt_beta2, dlr, eps, wd_coupled, lr, param, m, v,
                            s, grad):
    p = param.astype(ms.float32)
    g = grad.astype(ms.float32) + p * wd_coupled
    on = _flag(lr > 0.0)
    numerator = dlr * ops.reduce_sum(g * (s / (ops.sqrt(v) + eps))) * on
    ops.assign(m, _blend(on, m * beta1 + g * (dlr * om1), m))
    ops.assign(v, _blend(on, v * beta2 + ops.square(g) * om2, v))
    s_new = _blend(on, s * sqrt_beta2 + g * (dlr * om_sqrt_beta2), s)
    ops.assign(s, s_new)
    return ops.stack([numerator, ops.reduce_sum(ops.abs(s_new)) * on])


def _dadapt_adam_update(ok, dlr, eps, wd_decoupled, lr, param, m, v, s, grad):
    p = param.astype(ms.float32)
    p_new = p + p * (-wd_decoupled * dlr)
    p_new = p_new - m / (ops.sqrt(v) + eps)
    return ops.assign(param, _blend(ok, p_new, p).astype(param.dtype))


# -- schedule-free AdamW ---------------------------------------------------------------------------

class AdamWScheduleFree(GroupedOptimizer):
    """schedulefree's AdamWScheduleFree. The parameters hold y (where gradients are taken) in train mode
    and x (the averaged weights to evaluate and save) in eval mode; z is the state. A step (train mode):
    sched = min((k+1)/warmup_steps, 1), lr_max = max(lr_max, lr sched), weight = (k+1)^r lr_max^power,
    ckp1 = weight / (weight_sum += weight); v = beta2 v + (1 - beta2) g^2, gn = g / (sqrt(v / (1 -
    beta2^(k+1))) + eps) + wd y; y = lerp(y, z, ckp1) + lr sched (beta1 (1 - ckp1) - 1) gn; z -= lr sched gn.
    ``eval()``: p = lerp(p, z, 1 - 1/beta1); ``train()``: p = lerp(p, z, 1 - beta1) (no-ops before the
    first step, or when already in that mode).

    lr_max and weight_sum are the reference's per group; they are kept once, for the largest group lr:
    with lrs that keep their ratios (kohya gives schedule-free optimizers a constant schedule) ckp1 is
    the same for every group with lr > 0, and a group with lr 0 has y = z, so its lerp changes nothing."""

    def __init__(self, params, group_of, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                 r=0.0, weight_lr_power=2.0, foreach=True):
        super().__init__(params, group_of, lrs)
        self.z = self._zeros("z")
        self.exp_avg_sq = self._zeros("exp_avg_sq")
        self.k = _scalar_state(self, "k", 0.0)
        self.lr_max = _scalar_state(self, "lr_max", -1.0)
        self.weight_sum = _scalar_state(self, "weight_sum", 0.0)
        self.train_mode = _scalar_state(self, "train_mode", 1.0)  # kohya calls train() right after creating it
        _betas(self, betas[0], betas[1])
        self.eps, self.wd = _f32(eps), _f32(weight_decay)
        self.warmup_steps = int(warmup_steps)
        self.r, self.power = _f32(r), _f32(weight_lr_power)
        self.to_x = _f32(1.0 - 1.0 / float(betas[0]))  # eval(): the lerp weight from y to x
        self.to_y = _f32(1.0 - float(betas[0]))  # train(): from x to y
        self.update_fn = _schedule_free_update

    def step_scalars(self, step):
        k1 = self.k + 1.0
        sched = ops.minimum(k1 / self.warmup_steps, 1.0) if self.warmup_steps > 0 else ops.ones_like(k1)
        lr = ops.reduce_max(self.lrs) * sched
        lr_max = ops.maximum(lr, self.lr_max)
        weight = ops.pow(k1, self.r) * ops.pow(lr_max, self.power)
        weight_sum = self.weight_sum + weight
        ckp1 = _blend(_flag(weight_sum > 0.0), weight / ops.maximum(weight_sum, 1e-38), ops.zeros_like(weight))
        bc2 = _one_minus_pow(self.log_beta2, k1)
        ops.assign(self.lr_max, lr_max)
        ops.assign(self.weight_sum, weight_sum)
        ops.assign(self.k, k1)
        first = _flag(ops.equal(step, 1.0))  # the reference's state initialisation: z = p at the first step
        return first, self.beta1, self.beta2, self.om2, bc2, self.eps, self.wd, ckp1, sched

    def per_param_states(self):
        return self.z, self.exp_avg_sq

    def construct(self, grads):
        s = self.step_scalars(self._next_step())
        lrs = self._param_lrs()
        out = ()
        for i in range(len(self.params)):
            out = out + (_schedule_free_update(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], lrs[i],
                                               self.params[i], self.z[i], self.exp_avg_sq[i], grads[i]),)
        return out

    def _switch(self, to_train):
        """The parameters to y (train) or x (eval), in a small compiled graph; nothing if already there."""
        if "_mode_cell" not in self.__dict__:  # not a sub-cell: it holds this cell (a cycle in the cell tree)
            self.__dict__["_mode_cell"] = _ScheduleFreeMode(self)
        self.__dict__["_mode_cell"](Tensor(np.float32(1.0 if to_train else 0.0)))

    def train(self):
        self._switch(True)

    def eval(self):
        self._switch(False)


def _lerp(start, end, weight):
    """torch.lerp's formula (CPU and CUDA): start + w (end - start) for |w| < 0.5, else end - (end - start)
    (1 - w)."""
    small = _flag(ops.abs(weight) < 0.5)
    return _blend(small, start + weight * (end - start), end - (end - start) * (1.0 - weight))


def _schedule_free_update(first, beta1, beta2, om2, bc2, eps, wd, ckp1, sched, lr, param, z, v, grad):
    y = param.astype(ms.float32)
    g = grad.astype(ms.float32)
    lr = lr * sched
    z_old = _blend(first, y, z)
    v_new = v * beta2 + ops.square(g) * om2
    ops.assign(v, v_new)
    gn = g / (ops.sqrt(v_new / bc2) + eps) + y * wd
    y_new = _lerp(y, z_old, ckp1)
    y_new = y_new + gn * (lr * (beta1 * (1.0 - ckp1) - 1.0))
    ops.assign(z, z_old - gn * lr)
    return ops.assign(param, y_new.astype(param.dtype))


class _ScheduleFreeMode(ms.nn.Cell):
    """``AdamWScheduleFree.train()`` / ``eval()``: p = lerp(p, z, w) for every parameter when the mode changes
    and a step has set z (the reference's ``if 'z' in state``)."""

    def __init__(self, opt):
        super().__init__(auto_prefix=False)
        self.opt = opt

    def construct(self, to_train):
        opt = self.opt
        change = _flag(ops.not_equal(opt.train_mode, to_train)) * _flag(opt.k > 0.0)
        weight = _blend(to_train, opt.to_y, opt.to_x)
        out = ()
        for i in range(len(opt.params)):
            p = opt.params[i].astype(ms.float32)
            out = out + (ops.assign(opt.params[i], _blend(change, _lerp(p, opt.z[i], weight), p).astype(
                opt.params[i].dtype)),)
        return ops.depend(ops.assign(opt.train_mode, to_train), out)


# -- kohya's names for them ------------------------------------------------------------------------

# option key -> (class, the torch class kohya names in ss_optimizer, defaults = the accepted --optimizer_args)
SPECS = {
    "came": (CAME, "pytorch_optimizer.optimizer.came.CAME", CAME_DEFAULTS),
    "prodigy": (Prodigy, "prodigyopt.prodigy.Prodigy", PRODIGY_DEFAULTS),
    "dadaptadam": (DAdaptAdam, "dadaptation.dadapt_adam.DAdaptAdam", DADAPT_ADAM_DEFAULTS),
    "adamwschedulefree": (AdamWScheduleFree, "schedulefree.adamw_schedulefree.AdamWScheduleFree",
                          SCHEDULE_FREE_DEFAULTS),
}
# kohya takes CAME as a dotted class path (pytorch-optimizer is in its requirements); lowered
ALIASES = {"pytorch_optimizer.came": "came", "pytorch_optimizer.optimizer.came.came": "came",
           "prodigyopt.prodigy": "prodigy", "dadaptation.dadaptadam": "dadaptadam",
           "schedulefree.adamwschedulefree": "adamwschedulefree"}
BOOL_ARGS = ("weight_decouple", "fixed_decay", "ams_bound", "maximize", "decouple", "use_bias_correction",
             "safeguard_warmup", "fsdp_in_use", "foreach")


def check_kwargs(key, kwargs, name):
    """The values the cells cannot take (the type checks are ``train_optimizers._optimizer_kwargs``')."""
    if kwargs.get("fsdp_in_use"):
        raise UserError(f"--optimizer_args fsdp_in_use=True for {name}: FSDP is torch-only (this port's data "
                        "parallel sums the gradients before the update)")
    if kwargs.get("slice_p", 1) != 1:
        raise UserError(f"--optimizer_args slice_p for {name}: only 1 (every element) is available in this port, got "
                        f"{kwargs['slice_p']!r}")
    betas = kwargs.get("betas")
    if betas is not None and not all(0.0 <= b < 1.0 for b in betas[:2]):
        raise UserError(f"--optimizer_args betas for {name} must be in [0, 1), got {betas!r}")
    for k in ("d0", "eps"):
        if k in kwargs and not kwargs[k] > 0:
            raise UserError(f"--optimizer_args {k} for {name} must be > 0, got {kwargs[k]!r}")


def check_lr(key, lr, name):
    """prodigyopt / dadaptation / schedulefree refuse lr <= 0 at creation; kohya warns below 0.1 for d-adaptive ones."""
    if key in ("prodigy", "dadaptadam") and not (lr is not None and lr > 0):
        raise UserError(f"{name} needs --learning_rate > 0 (1.0 is the recommended value), got {lr}")


def create(key, params, group_of, lrs, kwargs, log):
    """The cell for ``key`` with the --optimizer_args given (the defaults for the rest)."""
    cls, _, defaults = SPECS[key]
    opts = dict(defaults, **kwargs)
    if key in ("prodigy", "dadaptadam"):
        top = max(lrs)
        if top <= 0.1:
            log.warning("learning rate is too low. If using D-Adaptation or Prodigy, set learning rate around 1.0: "
                        "lr=%s", top)
            log.warning("recommend option: lr=1.0")
        if len(set(lrs)) > 1:
            log.warning("when multiple learning rates are specified with dadaptation (e.g. for Text Encoder and "
                        "U-Net), only the first one will take effect: lr=%s", lrs[0])
    return cls(params, group_of, lrs, **opts)
