"""Optimizers and learning-rate schedules of the trainer (kohya's ``get_optimizer`` /
``get_scheduler_fix`` subset), graph-mode friendly.

``AdamW`` is torch's ``torch.optim.AdamW`` (bias-corrected, decoupled weight
decay, defaults lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01).
MindSpore's ``nn.AdamWeightDecay`` has no bias correction, so it is not used.
Each parameter group's learning rate is one element of a ``lrs`` Parameter,
set from the host before every update: the schedule changes no graph.

The schedules are diffusers' closed forms (kohya calls diffusers' get_scheduler),
as a function ``lr_lambda(step) -> multiplier`` of the optimizer step.
"""
from __future__ import annotations

import ast
import math
from typing import Callable, Dict, List, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from library.device_utils import UserError

ADAMW_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


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


class AdamW(nn.Cell):
    """torch.optim.AdamW over ``params`` with one learning rate per group (``group_of[i]``)."""

    def __init__(self, params: List[Parameter], group_of: List[int], lrs: List[float], betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0.01):
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        self.exp_avg = self.params.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.params.clone(prefix="exp_avg_sq", init="zeros")
        self.group_of = tuple(int(g) for g in group_of)
        self.lrs = Parameter(Tensor(np.asarray(lrs, np.float32)), name="optimizer_lrs", requires_grad=False)
        self.step_count = Parameter(Tensor(np.float32(0)), name="optimizer_step", requires_grad=False)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.beta1_t = Tensor(np.float32(self.beta1))
        self.beta2_t = Tensor(np.float32(self.beta2))
        self.eps_t = Tensor(np.float32(self.eps))
        self.wd_t = Tensor(np.float32(self.weight_decay))
        self.group_index = Tensor(np.asarray(self.group_of, np.int32))
        self.hyper_map = ops.HyperMap()

    def set_lrs(self, lrs):
        self.lrs.set_data(Tensor(np.asarray(lrs, np.float32)))

    def construct(self, grads):
        step = self.step_count + 1.0
        ops.assign(self.step_count, step)
        bc1 = 1.0 - ops.pow(self.beta1_t, step)
        sqrt_bc2 = ops.sqrt(1.0 - ops.pow(self.beta2_t, step))
        lrs = ops.unstack(ops.gather(self.lrs, self.group_index, 0))
        return self.hyper_map(ops.partial(_adamw_update, self.beta1_t, self.beta2_t, self.eps_t, self.wd_t, bc1,
                                          sqrt_bc2), lrs, self.params, self.exp_avg, self.exp_avg_sq, grads)


_adamw_update = ops.MultitypeFuncGraph("adamw_update")


@_adamw_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor", "Tensor")
def _adamw_update_tensor(beta1, beta2, eps, wd, bc1, sqrt_bc2, lr, param, m, v, grad):
    """torch.optim.AdamW for one parameter (decoupled decay, bias-corrected)."""
    g = grad.astype(ms.float32)
    m_new = m * beta1 + g * (1.0 - beta1)
    v_new = v * beta2 + ops.square(g) * (1.0 - beta2)
    denom = ops.sqrt(v_new) / sqrt_bc2 + eps
    p_new = param * (1.0 - lr * wd) - (lr / bc1) * (m_new / denom)
    ops.assign(m, m_new)
    ops.assign(v, v_new)
    return ops.assign(param, p_new.astype(param.dtype))


def check_optimizer_args(args):
    """The optimizer/scheduler argument checks of ``create_optimizer``/``create_lr_schedule``, run at start."""
    if getattr(args, "use_8bit_adam", False) or getattr(args, "use_lion_optimizer", False):
        raise UserError("--use_8bit_adam / --use_lion_optimizer are not implemented yet in this port "
                        "(use --optimizer_type AdamW)")
    opt_type = args.optimizer_type or "AdamW"
    if opt_type.lower() != "adamw":
        raise UserError(f"--optimizer_type {opt_type} is not implemented yet in this port (AdamW only)")
    kwargs = parse_optimizer_args(args.optimizer_args)
    unknown = sorted(set(kwargs) - {"betas", "eps", "weight_decay"})
    if unknown:
        raise UserError(f"--optimizer_args: AdamW takes betas, eps, weight_decay; not {', '.join(unknown)}")
    if args.lr_scheduler not in SCHEDULERS:
        raise UserError(f"--lr_scheduler {args.lr_scheduler} is not implemented yet in this port "
                        f"(available: {', '.join(SCHEDULERS)})")
    try:
        warmup = resolve_warmup_steps(args.lr_warmup_steps, 1000)
    except ValueError:
        raise UserError(f"--lr_warmup_steps must be an int, a ratio or 'N%', got {args.lr_warmup_steps!r}") from None
    if args.lr_scheduler == "constant" and warmup:
        raise UserError("--lr_scheduler constant does not take --lr_warmup_steps (use constant_with_warmup)")


def create_optimizer(args, param_groups):
    """(optimizer cell, name, args string, group lrs) for kohya's ``--optimizer_type``/``--optimizer_args``.

    ``param_groups``: kohya's ``[{"params": [...], "lr": lr}, ...]``."""
    opt_type = (args.optimizer_type or "AdamW")
    if getattr(args, "use_8bit_adam", False) or getattr(args, "use_lion_optimizer", False):
        raise UserError("--use_8bit_adam / --use_lion_optimizer are not implemented yet in this port "
                        "(use --optimizer_type AdamW)")
    if opt_type.lower() != "adamw":
        raise UserError(f"--optimizer_type {opt_type} is not implemented yet in this port (AdamW only)")
    kwargs = parse_optimizer_args(args.optimizer_args)
    unknown = sorted(set(kwargs) - {"betas", "eps", "weight_decay"})
    if unknown:
        raise UserError(f"--optimizer_args: AdamW takes betas, eps, weight_decay; not {', '.join(unknown)}")
    opts = dict(ADAMW_DEFAULTS)
    opts.update(kwargs)
    betas = opts["betas"]
    if not (isinstance(betas, tuple) and len(betas) == 2):
        raise UserError(f"--optimizer_args betas must be two numbers (betas=0.9,0.999), got {betas!r}")
    params, group_of, lrs = [], [], []
    for gi, group in enumerate(param_groups):
        lrs.append(float(group.get("lr", args.learning_rate)))
        for p in group["params"]:
            params.append(p)
            group_of.append(gi)
    opt = AdamW(params, group_of, lrs, betas=betas, eps=float(opts["eps"]),
                weight_decay=float(opts["weight_decay"]))
    args_str = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return opt, "torch.optim.AdamW", args_str, lrs


# -- learning-rate schedules (diffusers' closed forms) -----------------------------------------
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def resolve_warmup_steps(lr_warmup_steps, max_train_steps) -> int:
    """kohya: an int, or a float < 1 as a ratio of the training steps (``"10%"`` too)."""
    v = lr_warmup_steps
    if isinstance(v, str):
        v = v.strip()
        if v.endswith("%"):
            return int(float(v[:-1]) / 100.0 * max_train_steps)
        v = float(v) if any(c in v for c in ".eE") else int(v)
    if isinstance(v, float) and v < 1:
        return int(v * max_train_steps)
    return int(v)


def get_lr_lambda(name: str, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1,
                  power: float = 1.0, lr_end_ratio: float = None) -> Callable[[int], float]:
    if name not in SCHEDULERS:
        raise UserError(f"--lr_scheduler {name} is not implemented yet in this port "
                        f"(available: {', '.join(SCHEDULERS)})")
    w, n = int(num_warmup_steps), int(num_training_steps)
    if name == "constant":
        if w:
            raise UserError("constant does not require `num_warmup_steps`. Set None or 0 "
                            "(use --lr_scheduler constant_with_warmup)")
        return lambda step: 1.0

    def warm(step):
        return float(step) / float(max(1, w))

    if name == "constant_with_warmup":
        return lambda step: warm(step) if step < w else 1.0
    if name == "linear":
        return lambda step: warm(step) if step < w else max(0.0, float(n - step) / float(max(1, n - w)))
    if name == "cosine":
        def cosine(step):
            if step < w:
                return warm(step)
            progress = float(step - w) / float(max(1, n - w))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * 0.5 * progress)))
        return cosine
    if name == "cosine_with_restarts":
        def restarts(step):
            if step < w:
                return warm(step)
            progress = float(step - w) / float(max(1, n - w))
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))
        return restarts

    # polynomial (diffusers: lr_end 1e-7 absolute; here as ratio of the initial lr per group)
    def poly(step, lr_end_ratio=lr_end_ratio):
        if step < w:
            return warm(step)
        if step > n:
            return lr_end_ratio
        decay = (1 - lr_end_ratio) * (1 - (step - w) / max(1, n - w)) ** power + lr_end_ratio
        return decay
    return poly


class LRSchedule:
    """Per-group learning rates at an optimizer step: initial lr x ``lr_lambda(step)``."""

    def __init__(self, base_lrs: List[float], lr_lambda):
        self.base_lrs = list(base_lrs)
        self.lr_lambda = lr_lambda

    def lrs(self, step: int) -> List[float]:
        f = self.lr_lambda(step)
        return [lr * f for lr in self.base_lrs]


def create_lr_schedule(args, base_lrs, max_train_steps) -> LRSchedule:
    if getattr(args, "lr_scheduler_type", "") or getattr(args, "lr_scheduler_args", None):
        raise UserError("--lr_scheduler_type / --lr_scheduler_args are not implemented yet in this port")
    warmup = resolve_warmup_steps(args.lr_warmup_steps, max_train_steps)
    lr_end_ratio = None
    if args.lr_scheduler == "polynomial":
        # diffusers' lr_end=1e-7 is absolute for the optimizer's default lr; kohya passes one lr
        lr_end_ratio = 1e-7 / args.learning_rate if args.learning_rate > 0 else 0.0
    lam = get_lr_lambda(args.lr_scheduler, warmup, max_train_steps, args.lr_scheduler_num_cycles or 1,
                        args.lr_scheduler_power, lr_end_ratio)
    return LRSchedule(base_lrs, lam)
