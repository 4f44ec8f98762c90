"""Optimizers of the trainer: kohya's ``get_optimizer`` as graph-mode MindSpore cells.

Each optimizer reproduces the torch optimizer kohya creates for ``--optimizer_type``:

- ``AdamW`` (default): ``torch.optim.AdamW`` (bias-corrected, decoupled weight decay; defaults
  betas (0.9, 0.999), eps 1e-8, weight_decay 0.01). MindSpore's ``nn.AdamWeightDecay`` has no
  bias correction, so it is not used.
- ``SGDNesterov``: ``torch.optim.SGD(nesterov=True)``, momentum 0.9 unless given (kohya's default).
- ``Lion``: lion-pytorch's ``Lion`` (update = sign(beta1 m + (1 - beta1) g), decoupled weight decay
  p (1 - lr wd), then m = beta2 m + (1 - beta2) g; defaults betas (0.9, 0.99), weight_decay 0).
- ``AdaFactor``: ``transformers.optimization.Adafactor`` (factored second moments for 2-D+ params,
  relative_step / scale_parameter / warmup_init), with kohya's argument handling: relative_step
  defaults to True, and then --learning_rate is only the schedule's reported initial lr, the group
  lrs are dropped and the lr scheduler becomes ``adafactor:<lr>``.
- ``CAME``, ``Prodigy``, ``DAdaptAdam``, ``AdamWScheduleFree``: ``library/train_optimizers_adaptive.py``.
  AdamWScheduleFree, as kohya's schedule-free optimizers, takes a constant lr (its warmup is
  ``--optimizer_args warmup_steps=N``) and has ``train()``/``eval()``, which the trainer calls around
  sampling, validation and saving (``get_optimizer_train_eval_fn``).
- a dotted class path ``mypkg.MyOpt``: a cell following this module's optimizer protocol.

Optimizer protocol (all of them): ``__init__(params, group_of, lrs, **optimizer_args)`` where
``group_of[i]`` is the parameter group of ``params[i]`` and ``lrs`` one lr per group;
``set_lrs(lrs)`` (host, before an update); ``construct(grads)`` (one update, in the graph);
``state_parameters()`` -> the uniquely named Parameters holding its state (for save/resume).
The learning rates live in a ``lrs`` Parameter (one element per group), so the schedule changes no
graph; all state is float32.

The built-in ones (``GroupedOptimizer``) map one per-parameter function, ``update_fn(*step_scalars,
lr, param, *states, grad)``, over the parameters; ``step_scalars(step)`` gives the values shared by
every parameter at a step and ``per_param_states()`` a ParameterTuple per state, each aligned with
``params``, so that ``library.train_step.ParameterwiseUpdate`` can run the same function over chunks
of same-shape parameters, one small graph per chunk shape. (Their ``construct`` index the scalars
instead of unpacking them: MindSpore 2.10's graph compiler fails on a starred tuple there.)

The schedules are in ``library/lr_schedules.py`` (re-exported here).
"""
from __future__ import annotations

import ast
import logging
from typing import Dict, List, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.common.initializer import initializer

from library.device_utils import UserError
from library.run_args import RunArgs
from library.lr_schedules import (SCHEDULERS, AdafactorSchedule, LRSchedule, create_lr_schedule,  # noqa: F401
                                  get_lr_lambda, import_dotted, parse_scheduler_args, resolve_steps,
                                  resolve_warmup_steps)

logger = logging.getLogger(__name__)

ADAMW_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
SGD_DEFAULTS = dict(momentum=0.0, dampening=0.0, weight_decay=0.0)
LION_DEFAULTS = dict(betas=(0.9, 0.99), weight_decay=0.0, decoupled_weight_decay=False)
ADAFACTOR_DEFAULTS = dict(eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0,
                          scale_parameter=True, relative_step=True, warmup_init=False)


def parse_optimizer_args(optimizer_args: Sequence[str]) -> Dict:
    """kohya's ``key=value`` list (values through ``ast.literal_eval``; ``a,b`` -> tuple)."""
    kwargs = {}
    for arg in optimizer_args or []:
        if "=" not in arg:
            raise UserError(f"--optimizer_args: '{arg}' is not key=value")
        key, value = arg.split("=", 1)
        values = value.split(",")
        parsed = []
        for v in values:
            try:
                parsed.append(ast.literal_eval(v))
            except (ValueError, SyntaxError):
                parsed.append(v)
        kwargs[key.strip()] = parsed[0] if len(parsed) == 1 else tuple(parsed)
    return kwargs


# -- the optimizer cells ---------------------------------------------------------------------------

class GroupedOptimizer(nn.Cell):
    """Shared parts of the protocol: params, one lr per group in ``lrs``, a step counter, fp32 state."""

    def __init__(self, params: List[Parameter], group_of: List[int], lrs: List[float]):
        super().__init__(auto_prefix=False)
        if len(params) != len(group_of):
            raise ValueError("params and group_of differ in length")
        self.params = ParameterTuple(params)
        self.group_of = tuple(int(g) for g in group_of)
        self.num_groups = len(lrs)
        self.lrs = Parameter(Tensor(np.asarray(lrs, np.float32)), name="optimizer_lrs", requires_grad=False)
        self.step_count = Parameter(Tensor(np.float32(0)), name="optimizer_step", requires_grad=False)
        self.group_index = Tensor(np.asarray(self.group_of, np.int32))
        self.hyper_map = ops.HyperMap()
        self._state = [self.lrs, self.step_count]

    def _zeros(self, prefix, params=None, shape_fn=None):
        """fp32 zeros per parameter, named ``<prefix>.<param name>``."""
        return self._per_param(lambda s: (prefix, s if shape_fn is None else shape_fn(s)), params)

    def _per_param(self, choose, params=None):
        """One fp32 zero tensor per parameter: ``choose(shape) -> (prefix, shape)`` is a state tensor named
        ``<prefix>.<param name>``; ``(prefix, None)`` a 1-element placeholder outside the state (a statistic
        that this kind of parameter does not have)."""
        out = []
        for p in (self.params if params is None else params):
            prefix, shape = choose(tuple(p.shape))
            if shape is None:
                out.append(Parameter(initializer("zeros", (1,), ms.float32), name=f"{prefix}_unused.{p.name}",
                                     requires_grad=False))
                continue
            out.append(Parameter(initializer("zeros", shape, ms.float32), name=f"{prefix}.{p.name}",
                                 requires_grad=False))
            self._state.append(out[-1])
        return ParameterTuple(out)

    def set_lrs(self, lrs):
        self.lrs.set_data(Tensor(np.asarray(lrs, np.float32)))

    def state_parameters(self) -> List[Parameter]:
        return list(self._state)

    def _param_lrs(self):
        return ops.unstack(ops.gather(self.lrs, self.group_index, 0))

    def _next_step(self):
        step = self.step_count + 1.0
        ops.assign(self.step_count, step)
        return step

    def step_scalars(self, step):
        """The tensors every parameter's ``update_fn`` call starts with at this step (in the graph)."""
        raise NotImplementedError

    def per_param_states(self):
        """The state ParameterTuples ``update_fn`` takes after the parameter, each aligned with ``params``."""
        raise NotImplementedError


class AdamW(GroupedOptimizer):
    """torch.optim.AdamW over ``params`` with one learning rate per group (``group_of[i]``)."""

    def __init__(self, params: List[Parameter], group_of: List[int], lrs: List[float], betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0.01):
        super().__init__(params, group_of, lrs)
        self.exp_avg = self._zeros("exp_avg")
        self.exp_avg_sq = self._zeros("exp_avg_sq")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.beta1_t = Tensor(np.float32(self.beta1))
        self.beta2_t = Tensor(np.float32(self.beta2))
        self.eps_t = Tensor(np.float32(self.eps))
        self.wd_t = Tensor(np.float32(self.weight_decay))
        self.update_fn = _adamw_update

    def step_scalars(self, step):
        """torch's bias corrections folded into the step size, eps and decay (``_adamw_update_tensor``)."""
        bc1 = 1.0 - ops.pow(self.beta1_t, step)
        sqrt_bc2 = ops.sqrt(1.0 - ops.pow(self.beta2_t, step))
        return self.beta1_t, self.beta2_t, sqrt_bc2 / bc1, self.eps_t * sqrt_bc2, self.wd_t * bc1 / sqrt_bc2

    def per_param_states(self):
        return self.exp_avg, self.exp_avg_sq

    def construct(self, grads):
        s = self.step_scalars(self._next_step())
        return self.hyper_map(ops.partial(self.update_fn, s[0], s[1], s[2], s[3], s[4]), self._param_lrs(),
                              self.params, self.exp_avg, self.exp_avg_sq, grads)


_adamw_update = ops.MultitypeFuncGraph("adamw_update")


_adam_weight_decay = ops.AdamWeightDecay()


@_adamw_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor")
def _adamw_update_tensor(beta1, beta2, lr_factor, eps_c, wd_c, lr, param, m, v, grad):
    """torch.optim.AdamW for one parameter (decoupled decay, bias-corrected):
    p (1 - lr wd) - lr/bc1 m / (sqrt(v)/sqrt(bc2) + eps) written as p (1 - lr' wd') - lr' m / (sqrt(v) + eps')
    with lr' = lr sqrt(bc2)/bc1, eps' = eps sqrt(bc2), wd' = wd bc1/sqrt(bc2) (``AdamW.step_scalars``),
    which is the fused AdamWeightDecay kernel's update: one kernel instead of a dozen for fp32 tensors."""
    step_lr = lr * lr_factor
    if param.dtype == ms.float32 and grad.dtype == ms.float32:
        return _adam_weight_decay(param, m, v, step_lr, beta1, beta2, eps_c, wd_c, grad)[0]
    g = grad.astype(ms.float32)
    p = param.astype(ms.float32)
    m_new = m * beta1 + g * (1.0 - beta1)
    v_new = v * beta2 + ops.square(g) * (1.0 - beta2)
    p_new = p * (1.0 - step_lr * wd_c) - step_lr * (m_new / (ops.sqrt(v_new) + eps_c))
    ops.assign(m, m_new)
    ops.assign(v, v_new)
    return ops.assign(param, p_new.astype(param.dtype))


class SGDNesterov(GroupedOptimizer):
    """torch.optim.SGD(nesterov=True): buf = momentum buf + g (g with L2 weight decay), p -= lr (g + momentum buf)."""

    def __init__(self, params, group_of, lrs, momentum=0.9, dampening=0.0, weight_decay=0.0):
        super().__init__(params, group_of, lrs)
        if momentum <= 0 or dampening != 0:
            raise UserError("SGDNesterov: Nesterov momentum requires a momentum and zero dampening "
                            f"(got momentum={momentum}, dampening={dampening})")
        self.momentum_buffer = self._zeros("momentum_buffer")
        self.momentum_t = Tensor(np.float32(momentum))
        self.wd_t = Tensor(np.float32(weight_decay))
        self.update_fn = _sgd_nesterov_update

    def step_scalars(self, step):
        return self.momentum_t, self.wd_t

    def per_param_states(self):
        return (self.momentum_buffer,)

    def construct(self, grads):
        s = self.step_scalars(self._next_step())
        return self.hyper_map(ops.partial(self.update_fn, s[0], s[1]), self._param_lrs(), self.params,
                              self.momentum_buffer, grads)


_sgd_nesterov_update = ops.MultitypeFuncGraph("sgd_nesterov_update")


@_sgd_nesterov_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _sgd_nesterov_update_tensor(momentum, wd, lr, param, buf, grad):
    p = param.astype(ms.float32)
    g = grad.astype(ms.float32) + wd * p
    buf_new = buf * momentum + g  # torch: the first step's buffer is g itself (= 0 * momentum + g)
    d = g + momentum * buf_new
    ops.assign(buf, buf_new)
    return ops.assign(param, (p - lr * d).astype(param.dtype))


class Lion(GroupedOptimizer):
    """lion-pytorch's Lion: p *= 1 - lr wd; p -= lr sign(beta1 m + (1 - beta1) g); m = beta2 m + (1 - beta2) g.
    ``decoupled_weight_decay``: wd / initial lr (lion-pytorch divides by the lr it was created with)."""

    def __init__(self, params, group_of, lrs, betas=(0.9, 0.99), weight_decay=0.0, decoupled_weight_decay=False,
                 initial_lr=None):
        super().__init__(params, group_of, lrs)
        if decoupled_weight_decay:
            init_lr = initial_lr if initial_lr is not None else float(lrs[0])
            weight_decay = weight_decay / init_lr
        self.exp_avg = self._zeros("exp_avg")
        self.beta1_t = Tensor(np.float32(betas[0]))
        self.beta2_t = Tensor(np.float32(betas[1]))
        self.wd_t = Tensor(np.float32(weight_decay))
        self.update_fn = _lion_update

    def step_scalars(self, step):
        return self.beta1_t, self.beta2_t, self.wd_t

    def per_param_states(self):
        return (self.exp_avg,)

    def construct(self, grads):
        s = self.step_scalars(self._next_step())
        return self.hyper_map(ops.partial(self.update_fn, s[0], s[1], s[2]), self._param_lrs(), self.params,
                              self.exp_avg, grads)


_lion_update = ops.MultitypeFuncGraph("lion_update")


@_lion_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _lion_update_tensor(beta1, beta2, wd, lr, param, m, grad):
    g = grad.astype(ms.float32)
    p = param.astype(ms.float32) * (1.0 - lr * wd)
    update = ops.sign(m * beta1 + g * (1.0 - beta1))
    ops.assign(m, m * beta2 + g * (1.0 - beta2))
    return ops.assign(param, (p - lr * update).astype(param.dtype))


class Adafactor(GroupedOptimizer):
    """transformers.optimization.Adafactor. Parameters with 2+ dims keep factored second moments (row:
    mean over the last dim, col: mean over the one before); the others a full one. The lr of a parameter
    is ``rel * (max(eps2, RMS(p)) if scale_parameter else 1)`` with ``rel`` the group lr, or with
    relative_step ``min(1e-6 step if warmup_init else 1e-2, 1/sqrt(step))``. ``last_lrs`` holds the lr
    of each group's first parameter at the last update (what AdafactorSchedule reports).

    One update function for all parameters (the factored/full choice is made per shape at compile
    time); the moments a parameter does not use are 1-element placeholders outside ``state_parameters``."""

    def __init__(self, params, group_of, lrs, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                 weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False):
        super().__init__(params, group_of, lrs)
        if warmup_init and not relative_step:
            raise UserError("Adafactor: `warmup_init=True` requires `relative_step=True`")
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise UserError(f"Adafactor: eps must be two numbers (eps=1e-30,1e-3), got {eps!r}")
        self.relative_step = bool(relative_step)
        self.warmup_init = bool(warmup_init)
        self.use_first_moment = beta1 is not None
        if self.use_first_moment:
            self.exp_avg = self._zeros("exp_avg")
        self.exp_avg_sq_row = self._moments("exp_avg_sq_row", True, lambda s: s[:-1])
        self.exp_avg_sq_col = self._moments("exp_avg_sq_col", True, lambda s: s[:-2] + s[-1:])
        self.exp_avg_sq = self._moments("exp_avg_sq", False, lambda s: s)
        self.first_of_group = tuple(self.group_of.index(g) for g in range(self.num_groups))
        self.last_lrs = Parameter(Tensor(np.asarray(lrs, np.float32)), name="optimizer_last_lrs",
                                  requires_grad=False)
        self._state.append(self.last_lrs)
        self.eps1 = Tensor(np.float32(eps[0]))
        self.eps2 = Tensor(np.float32(eps[1]))
        self.clip = Tensor(np.float32(clip_threshold))
        self.decay_rate = Tensor(np.float32(decay_rate))
        self.beta1_t = Tensor(np.float32(beta1 if beta1 is not None else 0.0))
        self.wd_t = Tensor(np.float32(weight_decay))
        self.scale_t = Tensor(np.float32(1.0 if scale_parameter else 0.0))
        self.relative_t = Tensor(np.float32(1.0 if relative_step else 0.0))
        self.update_fn = _adafactor_update

    def _moments(self, prefix, factored, shape_fn):
        """The moment for parameters of this kind (factored: 2+ dims), a placeholder for the others."""
        return self._per_param(lambda s: (prefix, shape_fn(s) if (len(s) >= 2) == factored else None))

    def step_scalars(self, step):
        """Also records ``last_lrs`` (a side effect of the step, as the update itself)."""
        beta2t = 1.0 - ops.pow(step, self.decay_rate)
        if self.warmup_init:
            min_step = 1e-6 * step
        else:
            min_step = ops.ones_like(step) * 1e-2
        rel = ops.minimum(min_step, 1.0 / ops.sqrt(step))
        group_lrs = ops.unstack(self.lrs)
        # the reported lrs: each group's first parameter, before its update (AdafactorSchedule.get_lr)
        firsts = ()
        for i in self.first_of_group:
            base = rel * self.relative_t + group_lrs[self.group_of[i]] * (1.0 - self.relative_t)
            firsts = firsts + (_adafactor_lr(self.eps2, self.scale_t, base, self.params[i].astype(ms.float32)),)
        beta2t = ops.depend(beta2t, ops.assign(self.last_lrs, ops.stack(firsts)))
        return self.eps1, self.eps2, self.clip, beta2t, self.beta1_t, self.wd_t, self.scale_t, self.relative_t, rel

    def per_param_states(self):
        if self.use_first_moment:
            return self.exp_avg, self.exp_avg_sq_row, self.exp_avg_sq_col, self.exp_avg_sq
        return self.exp_avg_sq_row, self.exp_avg_sq_col, self.exp_avg_sq

    def construct(self, grads):
        step = self._next_step()
        s = self.step_scalars(step)
        update = ops.partial(self.update_fn, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8])
        if self.use_first_moment:
            return self.hyper_map(update, self._param_lrs(), self.params, self.exp_avg, self.exp_avg_sq_row,
                                  self.exp_avg_sq_col, self.exp_avg_sq, grads)
        return self.hyper_map(update, self._param_lrs(), self.params, self.exp_avg_sq_row, self.exp_avg_sq_col,
                              self.exp_avg_sq, grads)


def _rms(x):
    return ops.sqrt(ops.mean(ops.square(x)))


def _adafactor_lr(eps2, scale, rel, p):
    return (ops.maximum(eps2, _rms(p)) * scale + (1.0 - scale)) * rel


def _adafactor(eps1, eps2, clip, beta2t, beta1, wd, scale, relative, rel, group_lr, param, m, row, col, v, grad):
    g = grad.astype(ms.float32)
    p = param.astype(ms.float32)
    lr = _adafactor_lr(eps2, scale, rel * relative + group_lr * (1.0 - relative), p)
    sq = ops.square(g) + eps1
    if len(g.shape) >= 2:
        row_new = row * beta2t + ops.mean(sq, -1) * (1.0 - beta2t)
        col_new = col * beta2t + ops.mean(sq, -2) * (1.0 - beta2t)
        ops.assign(row, row_new)
        ops.assign(col, col_new)
        r_factor = ops.expand_dims(ops.rsqrt(row_new / ops.mean(row_new, -1, keep_dims=True)), -1)
        c_factor = ops.expand_dims(ops.rsqrt(col_new), -2)
        update = ops.broadcast_to(r_factor, g.shape) * ops.broadcast_to(c_factor, g.shape) * g
    else:
        v_new = v * beta2t + sq * (1.0 - beta2t)
        ops.assign(v, v_new)
        update = ops.rsqrt(v_new) * g
    update = update / ops.maximum(_rms(update) / clip, 1.0)
    update = update * lr
    if m is not None:
        update = m * beta1 + update * (1.0 - beta1)
        ops.assign(m, update)
    p_new = p + p * (-wd * lr)
    p_new = p_new - update
    return ops.assign(param, p_new.astype(param.dtype))


_adafactor_update = ops.MultitypeFuncGraph("adafactor_update")
_T = "Tensor"


@_adafactor_update.register(*([_T] * 16))
def _adafactor_update_m(eps1, eps2, clip, beta2t, beta1, wd, scale, relative, rel, group_lr, param, m, row, col, v,
                        grad):
    return _adafactor(eps1, eps2, clip, beta2t, beta1, wd, scale, relative, rel, group_lr, param, m, row, col, v,
                      grad)


@_adafactor_update.register(*([_T] * 15))
def _adafactor_update_no_m(eps1, eps2, clip, beta2t, beta1, wd, scale, relative, rel, group_lr, param, row, col, v,
                           grad):
    return _adafactor(eps1, eps2, clip, beta2t, beta1, wd, scale, relative, rel, group_lr, param, None, row, col, v,
                      grad)


# -- kohya's get_optimizer -------------------------------------------------------------------------

OPTIMIZERS = {"adamw": "AdamW", "sgdnesterov": "SGDNesterov", "lion": "Lion", "adafactor": "AdaFactor",
              "came": "CAME", "prodigy": "Prodigy", "dadaptadam": "DAdaptAdam",
              "adamwschedulefree": "AdamWScheduleFree"}  # last four: train_optimizers_adaptive
# option -> (torch class kohya names in ss_optimizer, accepted --optimizer_args)
_SPECS = {
    "adamw": ("torch.optim.adamw.AdamW", ("betas", "eps", "weight_decay")),
    "sgdnesterov": ("torch.optim.sgd.SGD", ("momentum", "dampening", "weight_decay")),
    "lion": ("lion_pytorch.lion_pytorch.Lion", ("betas", "weight_decay", "decoupled_weight_decay")),
    "adafactor": ("transformers.optimization.Adafactor", tuple(ADAFACTOR_DEFAULTS)),
}


def _adaptive():
    """``library.train_optimizers_adaptive`` (CAME, Prodigy, DAdaptAdam, AdamWScheduleFree), imported when used:
    it subclasses GroupedOptimizer, so importing it here at load time would be circular."""
    from library import train_optimizers_adaptive
    return train_optimizers_adaptive


def _spec(key):
    """(torch class kohya names in ss_optimizer, accepted --optimizer_args) of a built-in key."""
    if key in _SPECS:
        return _SPECS[key]
    _, torch_name, defaults = _adaptive().SPECS[key]
    return torch_name, tuple(defaults)


_NOT_AVAILABLE = {  # kohya's other optimizer types: CUDA-only packages or not ported
    "adamw8bit": "bitsandbytes 8-bit optimizers are CUDA-only", "sgdnesterov8bit": "bitsandbytes (CUDA-only)",
    "lion8bit": "bitsandbytes (CUDA-only)", "pagedadamw8bit": "bitsandbytes paged optimizers are CUDA-only",
    "pagedlion8bit": "bitsandbytes (CUDA-only)", "pagedadamw": "bitsandbytes (CUDA-only)",
    "pagedadamw32bit": "bitsandbytes (CUDA-only)",
    "radamschedulefree": "not ported", "sgdschedulefree": "not ported",
    "dadaptation": "kohya's DAdaptation is dadaptation's experimental DAdaptAdamPreprint, not ported; DAdaptAdam is",
}


def _resolve_type(args) -> str:
    """kohya's optimizer_type after --use_8bit_adam / --use_lion_optimizer, not lowered."""
    opt_type = args.optimizer_type or ""
    if getattr(args, "use_8bit_adam", False):
        raise UserError("--use_8bit_adam is not available in this port (bitsandbytes 8-bit AdamW is CUDA-only): "
                        "use --optimizer_type AdamW")
    if getattr(args, "use_lion_optimizer", False):
        if opt_type:
            raise UserError("both option use_lion_optimizer and optimizer_type are specified")
        opt_type = "Lion"
    return opt_type or "AdamW"


def _custom_optimizer_class(path: str):
    module_name, attr = path.rsplit(".", 1)
    cls = import_dotted(path, "--optimizer_type")
    if not isinstance(cls, type):
        raise UserError(f"--optimizer_type {path}: {module_name} has no class {attr}")
    missing = [m for m in ("construct", "set_lrs", "state_parameters") if not callable(getattr(cls, m, None))]
    if not issubclass(cls, nn.Cell) or missing:
        raise UserError(f"--optimizer_type {path}: not an optimizer cell of this port (a mindspore.nn.Cell with "
                        f"__init__(params, group_of, lrs, **kwargs), set_lrs, construct(grads), state_parameters"
                        f"{'; missing ' + ', '.join(missing) if missing else ''})")
    return cls


def _check_type(opt_type: str):
    """-> the lowered built-in key, or None for a dotted class path (checked); errors for the rest."""
    key = _adaptive().ALIASES.get(opt_type.lower(), opt_type.lower())
    if key in OPTIMIZERS:
        return key
    if key in _NOT_AVAILABLE or key.endswith("8bit") or key.startswith("dadapt"):
        why = _NOT_AVAILABLE.get(key, "bitsandbytes (CUDA-only)" if key.endswith("8bit") else "not ported")
        raise UserError(f"--optimizer_type {opt_type} is not available in this port ({why}): use AdamW, "
                        "SGDNesterov, Lion, AdaFactor, CAME, Prodigy, DAdaptAdam or AdamWScheduleFree")
    if "." in opt_type:
        _custom_optimizer_class(opt_type)
        return None
    raise UserError(f"--optimizer_type {opt_type} is not available in this port (kohya takes it from torch.optim): "
                    "use AdamW, SGDNesterov, Lion, AdaFactor, CAME, Prodigy, DAdaptAdam, AdamWScheduleFree or a "
                    "dotted path to a MindSpore optimizer cell")


_BOOL_ARGS = ("decoupled_weight_decay", "scale_parameter", "relative_step", "warmup_init")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optimizer_kwargs(key, kwargs, log=False):
    """Check the --optimizer_args of a built-in optimizer; -> kwargs with kohya's adjustments (and, with
    ``log``, kohya's messages about them)."""
    _, accepted = _spec(key)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(f"--optimizer_args: {OPTIMIZERS[key]} takes {', '.join(accepted)}; not {', '.join(unknown)}")
    kwargs = dict(kwargs)
    for k, v in kwargs.items():
        pair = k == "betas" or (k == "eps" and key == "adafactor")
        n = 3 if key == "came" and k == "betas" else 2  # CAME's third beta: the confidence EMA
        if k in _BOOL_ARGS or k in _adaptive().BOOL_ARGS:
            ok, what = isinstance(v, bool), "True or False"
        elif pair:
            ok = isinstance(v, tuple) and len(v) == n and all(_is_number(x) for x in v)
            what = "two numbers (a,b)" if n == 2 else "three numbers (a,b,c)"
        elif k in ("beta1", "beta3"):
            ok, what = v is None or _is_number(v), "a number or None"
        else:
            ok, what = _is_number(v), "a number"
        if not ok:
            raise UserError(f"--optimizer_args {k} for {OPTIMIZERS[key]} must be {what}, got {v!r}")
    if key == "sgdnesterov" and "momentum" not in kwargs:
        if log:
            logger.info("SGD with Nesterov must be with momentum, set momentum to 0.9")
        kwargs["momentum"] = 0.9
    if key == "sgdnesterov" and (kwargs["momentum"] <= 0 or kwargs.get("dampening", 0) != 0):
        raise UserError("SGDNesterov: Nesterov momentum requires a momentum and zero dampening "
                        f"(got momentum={kwargs['momentum']}, dampening={kwargs.get('dampening', 0)})")
    if key in _adaptive().SPECS:
        _adaptive().check_kwargs(key, kwargs, OPTIMIZERS[key])
    if key == "adafactor":
        if "relative_step" not in kwargs:
            kwargs["relative_step"] = True  # kohya's default
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            if log:
                logger.info("set relative_step to True because warmup_init is True")
            kwargs["relative_step"] = True
    return kwargs


def check_optimizer_args(args):
    """The checks of ``create_optimizer``/``create_lr_schedule``, run at start (nothing is built)."""
    opt_type = _resolve_type(args)
    key = _check_type(opt_type)
    kwargs = parse_optimizer_args(args.optimizer_args)
    if key is not None:
        kwargs = _optimizer_kwargs(key, kwargs)
    if key == "lion" and not (args.learning_rate and args.learning_rate > 0):
        raise UserError(f"Lion needs --learning_rate > 0, got {args.learning_rate}")
    if key in _adaptive().SPECS:
        _adaptive().check_lr(key, args.learning_rate, OPTIMIZERS[key])
    if key != "adafactor" and args.lr_scheduler.startswith("adafactor"):
        raise UserError("adafactor scheduler must be used with Adafactor optimizer (--optimizer_type AdaFactor)")
    if key == "adafactor" and not kwargs["relative_step"] and args.lr_scheduler.startswith("adafactor"):
        raise UserError("--lr_scheduler adafactor needs --optimizer_type AdaFactor with relative_step=True "
                        "(with relative_step=False use e.g. constant_with_warmup)")
    # the schedule, built with the steps known now (max_train_epochs may change them later), with the
    # scheduler kohya's get_optimizer leaves (Adafactor relative_step: adafactor:<lr>)
    checked = RunArgs(args)
    checked.derive(lr_scheduler=relative_step_overrides(args, []).get("lr_scheduler", args.lr_scheduler),
                   learning_rate=args.learning_rate if args.learning_rate is not None else 0.0)
    steps = 10 ** 9 if getattr(args, "max_train_epochs", None) else max(1, args.max_train_steps or 1)
    create_lr_schedule(checked, [1.0], steps)


def relative_step_overrides(args, param_groups):
    """What kohya's ``get_optimizer`` writes into ``args`` for Adafactor with relative_step (which the
    schedule and the metadata then read): ``learning_rate`` None, ``lr_scheduler`` ``adafactor:<lr>`` and,
    when the groups had lrs, ``unet_lr`` / ``text_encoder_lr`` None. {} for every other optimizer."""
    key = _check_type(_resolve_type(args))
    if key != "adafactor" or not _optimizer_kwargs(key, parse_optimizer_args(args.optimizer_args),
                                                   log=False)["relative_step"]:
        return {}
    values = dict(learning_rate=None, lr_scheduler=f"adafactor:{args.learning_rate}")
    if any("lr" in g for g in param_groups):
        values.update(unet_lr=None, text_encoder_lr=None)
    return values


def create_optimizer(args, param_groups):
    """kohya's ``get_optimizer``: (optimizer cell, name, args string, group lrs).

    ``param_groups``: kohya's ``[{"params": [...], "lr": lr}, ...]``. ``args`` is not changed; what kohya
    changes in it for Adafactor's relative_step is ``relative_step_overrides``."""
    check_optimizer_args(args)
    opt_type = _resolve_type(args)
    key = _check_type(opt_type)
    raw_kwargs = parse_optimizer_args(args.optimizer_args)
    lr = args.learning_rate
    params, group_of, lrs = [], [], []
    for gi, group in enumerate(param_groups):
        lrs.append(float(group.get("lr", lr)))
        for p in group["params"]:
            params.append(p)
            group_of.append(gi)

    if key is None:  # a dotted class path
        cls = _custom_optimizer_class(opt_type)
        logger.info("use %s | %s", opt_type, raw_kwargs)
        try:
            opt = cls(params, group_of, lrs, **raw_kwargs)
        except TypeError as e:
            raise UserError(f"--optimizer_type {opt_type}: cannot create it with --optimizer_args {raw_kwargs} "
                            f"({e})") from None
        name = cls.__module__ + "." + cls.__name__
        return opt, name, ",".join(f"{k}={v}" for k, v in raw_kwargs.items()), lrs

    kwargs = _optimizer_kwargs(key, raw_kwargs, log=True)  # what kohya passes (and writes into ss_optimizer)
    if key == "adamw":
        logger.info("use AdamW optimizer | %s", kwargs)
        opts = dict(ADAMW_DEFAULTS, **kwargs)
        opt = AdamW(params, group_of, lrs, betas=opts["betas"], eps=float(opts["eps"]),
                    weight_decay=float(opts["weight_decay"]))
    elif key == "sgdnesterov":
        logger.info("use SGD with Nesterov optimizer | %s", kwargs)
        opts = dict(SGD_DEFAULTS, **kwargs)
        opt = SGDNesterov(params, group_of, lrs, momentum=float(opts["momentum"]),
                          dampening=float(opts["dampening"]), weight_decay=float(opts["weight_decay"]))
    elif key in _adaptive().SPECS:
        logger.info("use %s optimizer | %s", OPTIMIZERS[key], kwargs)
        opt = _adaptive().create(key, params, group_of, lrs, kwargs, logger)
    elif key == "lion":
        logger.info("use Lion optimizer | %s", kwargs)
        opts = dict(LION_DEFAULTS, **kwargs)
        opt = Lion(params, group_of, lrs, betas=opts["betas"], weight_decay=float(opts["weight_decay"]),
                   decoupled_weight_decay=bool(opts["decoupled_weight_decay"]), initial_lr=lr)
    else:
        logger.info("use Adafactor optimizer | %s", kwargs)
        opts = dict(ADAFACTOR_DEFAULTS, **kwargs)
        if opts["relative_step"]:  # the changes kohya makes to args: relative_step_overrides
            logger.info("relative_step is true")
            if lr != 0.0:
                logger.warning("learning rate is used as initial_lr")
            if any("lr" in g for g in param_groups):
                logger.warning("unet_lr and text_encoder_lr are ignored")
            if args.lr_scheduler != "adafactor":
                logger.info("use adafactor_scheduler")
            lrs = [float(lr)] * len(param_groups)  # AdafactorSchedule's initial lr per group (unused by the update)
        else:
            if args.max_grad_norm != 0.0:
                logger.warning("because max_grad_norm is set, clip_grad_norm is enabled. consider set to 0")
            if args.lr_scheduler != "constant_with_warmup":
                logger.warning("constant_with_warmup will be good")
            if opts["clip_threshold"] != 1.0:
                logger.warning("clip_threshold=1.0 will be good")
        opt = Adafactor(params, group_of, lrs, eps=tuple(opts["eps"]), clip_threshold=float(opts["clip_threshold"]),
                        decay_rate=float(opts["decay_rate"]),
                        beta1=None if opts["beta1"] is None else float(opts["beta1"]),
                        weight_decay=float(opts["weight_decay"]), scale_parameter=bool(opts["scale_parameter"]),
                        relative_step=bool(opts["relative_step"]), warmup_init=bool(opts["warmup_init"]))
    name = _spec(key)[0]
    args_str = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return opt, name, args_str, lrs


def is_schedule_free(args) -> bool:
    """kohya's ``is_schedulefree_optimizer``: the --optimizer_type name ends with ScheduleFree (a dotted class
    path too). Such an optimizer gets a constant lr (``lr_schedules.create_lr_schedule``) and is switched
    to its evaluation weights around sampling, validation and saving (``get_optimizer_train_eval_fn``)."""
    return (getattr(args, "optimizer_type", None) or "").lower().endswith("schedulefree")


def get_optimizer_train_eval_fn(optimizer, args):
    """kohya's ``get_optimizer_train_eval_fn``: (train_fn, eval_fn), the optimizer's ``train``/``eval`` for a
    schedule-free one (the parameters to y, where gradients are taken, or to x, the averaged weights that
    are sampled, validated and saved), no-ops for the others."""
    if not is_schedule_free(args):
        return (lambda: None), (lambda: None)
    missing = [m for m in ("train", "eval") if not callable(getattr(optimizer, m, None))]
    if missing:  # kohya would fail with an AttributeError at the first sample/save
        raise UserError(f"--optimizer_type {args.optimizer_type}: a schedule-free optimizer (the name ends with "
                        f"ScheduleFree) needs methods train() and eval(); this one has no {' or '.join(missing)}")
    return optimizer.train, optimizer.eval
