"""Learning-rate schedules of the trainer: kohya's ``get_scheduler_fix`` as host-side closed forms.

kohya builds its schedules with transformers' ``TYPE_TO_SCHEDULER_FUNCTION`` (constant,
constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt,
cosine_with_min_lr, warmup_stable_decay), diffusers' ``get_piecewise_constant_schedule`` and
transformers' ``AdafactorSchedule``. Each is a ``LambdaLR``: group lr = the group's initial lr x
``lr_lambda(step)``. Here the same multipliers are plain functions of the optimizer step, evaluated
on the host; the optimizer cell receives the per-group lrs through ``set_lrs`` before every update,
so the schedule changes no graph. ``--lr_scheduler_args key=value`` are passed to the schedule
function as kohya passes them (only the keys that function takes and kohya does not set itself).

A schedule object has ``base_lrs`` and ``lrs(step) -> [lr per group]``; ``step`` is the number of
optimizer updates done (0 before the first update), as a torch LambdaLR's ``last_epoch``.
"""
from __future__ import annotations

import ast
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from library.device_utils import UserError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")
# kohya's names that exist in transformers but crash in kohya's get_scheduler_fix (TypeError on its kwargs)
_UNSUPPORTED = {
    "reduce_lr_on_plateau": "needs a validation metric per step (kohya passes it num_warmup_steps and fails)",
    "cosine_warmup_with_min_lr": "kohya passes it num_decay_steps, which it does not take (kohya fails)",
}
# --lr_scheduler_args each schedule function takes that kohya does not already pass (last_epoch left out:
# a LambdaLR with last_epoch != -1 needs 'initial_lr' in its groups, which kohya never sets)
SCHEDULER_ARGS: Dict[str, tuple] = {
    "constant": (), "constant_with_warmup": (), "linear": (), "cosine": ("num_cycles",),
    "cosine_with_restarts": (), "polynomial": ("lr_end",), "inverse_sqrt": (), "cosine_with_min_lr": ("min_lr",),
    "warmup_stable_decay": ("warmup_type", "decay_type"), "piecewise_constant": ("step_rules",), "adafactor": (),
}
_WSD_TYPES = ("linear", "cosine", "1-sqrt")


def parse_scheduler_args(lr_scheduler_args) -> Dict:
    """kohya: ``key=value`` with the value through ``ast.literal_eval``; a value that is not a Python
    literal (kohya fails on it, e.g. ``step_rules=1:10,0.1``) is kept as the plain string."""
    kwargs = {}
    for arg in lr_scheduler_args or []:
        if "=" not in arg:
            raise UserError(f"--lr_scheduler_args: '{arg}' is not key=value")
        key, value = arg.split("=", 1)
        try:
            kwargs[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value
    return kwargs


def resolve_steps(value, max_train_steps, what="--lr_warmup_steps") -> int:
    """kohya's ``int_or_float``: an int, a float < 1 as a ratio of the training steps, or ``"N%"``."""
    v = value
    try:
        if isinstance(v, str):
            v = v.strip()
            if v.endswith("%"):
                return int(float(v[:-1]) / 100.0 * max_train_steps)
            f = float(v)
            v = f if f < 1 else int(v)  # kohya: int(value) for >= 1 ("1.5" is an error)
        if isinstance(v, float) and v < 1:
            return int(v * max_train_steps)
        if isinstance(v, float) and v != int(v):
            raise ValueError(v)
        v = int(v)
    except ValueError:
        raise UserError(f"{what} must be an int, a ratio < 1 or 'N%', got {value!r}") from None
    if v < 0:
        raise UserError(f"{what} must be >= 0, got {value!r}")
    return v


def resolve_warmup_steps(lr_warmup_steps, max_train_steps) -> int:
    return resolve_steps(lr_warmup_steps, max_train_steps, "--lr_warmup_steps")


# -- closed forms (transformers.optimization / diffusers.optimization) -------------------------------

def _warm(step, w):
    return float(step) / float(max(1, w))


def piecewise_constant_lambda(step_rules: str) -> Callable[[int], float]:
    """diffusers' get_piecewise_constant_schedule: ``"1:10,0.1:20,0.01"`` -> x1 while step < 10,
    x0.1 while step < 20, then x0.01."""
    try:
        rules = str(step_rules).split(",")
        thresholds = {}
        for rule in rules[:-1]:
            value_str, steps_str = rule.split(":")
            thresholds[int(steps_str)] = float(value_str)
        last = float(rules[-1])
    except ValueError:
        raise UserError(f"--lr_scheduler_args step_rules: cannot parse {step_rules!r} "
                        "(expected multiplier:step,...,multiplier, e.g. step_rules=1:10,0.1:20,0.01)") from None
    ordered = sorted(thresholds)

    def rule(step):
        for s in ordered:
            if step < s:
                return thresholds[s]
        return last
    return rule


@dataclass
class _ScheduleArgs:
    """What a schedule's multiplier is built from: warmup and training steps, kohya's ``--lr_scheduler_*``
    values and the ``--lr_scheduler_args`` (``kwargs``)."""
    w: int
    n: int
    num_cycles: float
    power: float
    lr_end_ratio: Optional[float]
    num_decay_steps: int
    timescale: Optional[int]
    min_lr_ratio: Optional[float]
    lr_init: Optional[float]
    kwargs: Dict


def _constant(a):
    if a.w:
        raise UserError("constant does not require `num_warmup_steps`. Set None or 0 "
                        "(use --lr_scheduler constant_with_warmup)")
    return lambda step: 1.0


def _piecewise_constant(a):
    if a.w:
        raise UserError("--lr_scheduler piecewise_constant does not use --lr_warmup_steps "
                        "(kohya ignores it): put the steps in step_rules")
    if "step_rules" not in a.kwargs:
        raise UserError("--lr_scheduler piecewise_constant needs --lr_scheduler_args "
                        "step_rules=multiplier:step,...,multiplier (e.g. step_rules=1:10,0.1:20,0.01)")
    return piecewise_constant_lambda(a.kwargs["step_rules"])


def _constant_with_warmup(a):
    w = a.w
    return lambda step: _warm(step, w) if step < w else 1.0


def _inverse_sqrt(a):
    w = a.w
    ts = a.timescale if a.timescale is not None else (w or 10_000)
    if ts <= 0:
        raise UserError(f"--lr_scheduler_timescale must be positive, got {ts}")
    shift = ts - w
    return lambda step: _warm(step, w) if step < w else 1.0 / math.sqrt((step + shift) / ts)


def _linear(a):
    w, n = a.w, a.n
    return lambda step: _warm(step, w) if step < w else max(0.0, float(n - step) / float(max(1, n - w)))


def _cosine_lambda(w, n, cycles, min_rate):
    def cosine(step):
        if step < w:
            return _warm(step, w)
        progress = float(step - w) / float(max(1, n - w))
        factor = 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress))
        return max(0.0, factor) if min_rate is None else max(0.0, factor * (1 - min_rate) + min_rate)
    return cosine


def _cosine(a):
    return _cosine_lambda(a.w, a.n, float(a.kwargs.get("num_cycles", 0.5)), None)


def _cosine_with_min_lr(a):
    # kohya: num_cycles=lr_scheduler_num_cycles / 2, min_lr_rate=lr_scheduler_min_lr_ratio
    min_lr = a.kwargs.get("min_lr")
    if a.min_lr_ratio is not None and min_lr is not None:
        raise UserError("cosine_with_min_lr: only one of --lr_scheduler_min_lr_ratio and "
                        "--lr_scheduler_args min_lr may be set")
    if a.min_lr_ratio is None and min_lr is None:
        raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio "
                        "(or --lr_scheduler_args min_lr=...)")
    if a.min_lr_ratio is not None:
        min_rate = float(a.min_lr_ratio)
    else:  # transformers: min_lr / optimizer.defaults["lr"]
        if not a.lr_init:
            raise UserError("cosine_with_min_lr: min_lr needs a non-zero --learning_rate")
        min_rate = float(min_lr) / a.lr_init
    return _cosine_lambda(a.w, a.n, a.num_cycles / 2, min_rate)


def _cosine_with_restarts(a):
    w, n, num_cycles = a.w, a.n, float(a.num_cycles)

    def restarts(step):
        if step < w:
            return _warm(step, w)
        progress = float(step - w) / float(max(1, n - w))
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
    return restarts


# warmup_stable_decay's shapes: progress in [0, 1] -> factor (warmup rises with it, decay falls)
_WSD_WARMUP = {"linear": lambda p: p, "cosine": lambda p: 0.5 * (1.0 - math.cos(math.pi * p)),
               "1-sqrt": lambda p: 1.0 - math.sqrt(1.0 - p)}
_WSD_DECAY = {"linear": lambda p, cycles: 1.0 - p,
              "cosine": lambda p, cycles: 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * p)),
              "1-sqrt": lambda p, cycles: 1.0 - math.sqrt(p)}


def _warmup_stable_decay(a):
    w, n, d = a.w, a.n, int(a.num_decay_steps)
    stable = n - w - d
    if stable < 0:
        raise UserError(f"warmup_stable_decay: --lr_warmup_steps ({w}) + --lr_decay_steps ({d}) exceed the "
                        f"training steps ({n})")
    warmup_type = a.kwargs.get("warmup_type", "linear")
    decay_type = a.kwargs.get("decay_type", "cosine")
    for what, t in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if t not in _WSD_TYPES:
            raise UserError(f"--lr_scheduler_args {what}={t}: expected one of {', '.join(_WSD_TYPES)}")
    warmup, decay = _WSD_WARMUP[warmup_type], _WSD_DECAY[decay_type]
    mr = float(a.min_lr_ratio) if a.min_lr_ratio is not None else 0.0
    cycles = a.num_cycles / 2  # kohya passes num_cycles=lr_scheduler_num_cycles / 2

    def wsd(step):
        if step < w:
            return max(0.0, warmup(float(step) / float(max(1, w))) * (1.0 - mr) + mr)
        if step < w + stable:
            return 1.0
        if step < w + stable + d:
            return max(0.0, decay(float(step - w - stable) / float(max(1, d)), cycles) * (1.0 - mr) + mr)
        return mr
    return wsd


def _polynomial(a):
    # transformers: lr_end absolute, default 1e-7; the multiplier is decay / lr_init
    w, n, power, lr_end_ratio = a.w, a.n, a.power, a.lr_end_ratio
    if lr_end_ratio is None:
        lr_end = float(a.kwargs.get("lr_end", 1e-7))
        if not (a.lr_init is not None and a.lr_init > lr_end):
            raise UserError(f"--lr_scheduler polynomial: lr_end ({lr_end}) must be smaller than the initial lr "
                            f"(--learning_rate {a.lr_init})")
        lr_end_ratio = lr_end / a.lr_init

    def poly(step):
        if step < w:
            return _warm(step, w)
        if step > n:
            return lr_end_ratio
        pct_remaining = 1 - (step - w) / (n - w) if n > w else 0.0
        return (1 - lr_end_ratio) * pct_remaining ** power + lr_end_ratio
    return poly


# --lr_scheduler name -> builder of its multiplier (adafactor's lr is computed by the optimizer)
LR_LAMBDAS: Dict[str, Callable[[_ScheduleArgs], Callable[[int], float]]] = {
    "constant": _constant, "constant_with_warmup": _constant_with_warmup, "linear": _linear,
    "cosine": _cosine, "cosine_with_restarts": _cosine_with_restarts, "polynomial": _polynomial,
    "inverse_sqrt": _inverse_sqrt, "cosine_with_min_lr": _cosine_with_min_lr,
    "warmup_stable_decay": _warmup_stable_decay, "piecewise_constant": _piecewise_constant,
}


def get_lr_lambda(name: str, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 1,
                  power: float = 1.0, lr_end_ratio: float = None, *, num_decay_steps: int = 0,
                  timescale: Optional[int] = None, min_lr_ratio: Optional[float] = None,
                  lr_init: Optional[float] = None, scheduler_args: Optional[Dict] = None) -> Callable[[int], float]:
    """The multiplier ``lr_lambda(step)`` of ``--lr_scheduler name`` with kohya's arguments.

    ``num_cycles``/``power``/``timescale``/``min_lr_ratio``/``num_decay_steps`` are kohya's
    ``--lr_scheduler_*`` / ``--lr_decay_steps`` values; ``scheduler_args`` are ``--lr_scheduler_args``;
    ``lr_end_ratio`` is polynomial's lr_end / initial lr (transformers' lr_end is absolute);
    ``lr_init`` is the optimizer's lr (--learning_rate), for cosine_with_min_lr's absolute min_lr."""
    kwargs = dict(scheduler_args or {})
    if name.startswith("adafactor"):
        raise UserError("--lr_scheduler adafactor is the lr Adafactor computes: it needs --optimizer_type "
                        "AdaFactor with relative_step=True")
    if name not in SCHEDULERS:
        raise UserError(f"--lr_scheduler {name} is not available in this port "
                        f"({_UNSUPPORTED.get(name, 'unknown')}; available: {', '.join(SCHEDULERS)})")
    unknown = sorted(set(kwargs) - set(SCHEDULER_ARGS[name]))
    if unknown:
        takes = ", ".join(SCHEDULER_ARGS[name]) or "no arguments"
        raise UserError(f"--lr_scheduler_args: {name} takes {takes}; not {', '.join(unknown)}")
    return LR_LAMBDAS[name](_ScheduleArgs(int(num_warmup_steps), int(num_training_steps), num_cycles, power,
                                          lr_end_ratio, num_decay_steps, timescale, min_lr_ratio, lr_init, kwargs))


# -- schedule objects -------------------------------------------------------------------------------

class LRSchedule:
    """Per-group learning rates at an optimizer step: initial lr x ``lr_lambda(step)``."""

    def __init__(self, base_lrs: List[float], lr_lambda):
        self.base_lrs = list(base_lrs)
        self.lr_lambda = lr_lambda

    def lrs(self, step: int) -> List[float]:
        f = self.lr_lambda(step)
        return [lr * f for lr in self.base_lrs]


class AdafactorSchedule:
    """transformers' AdafactorSchedule: the lrs Adafactor computed at its last update (the lr of each
    group's first parameter, kohya's logged value); ``initial_lr`` per group before the first update.
    Adafactor with relative_step ignores the lrs it is given, so this schedule only reports."""

    def __init__(self, optimizer, initial_lr: float, num_groups: int):
        self.optimizer = optimizer
        self.base_lrs = [float(initial_lr)] * num_groups

    def lrs(self, step: int) -> List[float]:
        if self.optimizer is None or float(self.optimizer.step_count.asnumpy()) == 0:
            return list(self.base_lrs)
        return [float(x) for x in self.optimizer.last_lrs.asnumpy()]


def import_dotted(path: str, option: str):
    """The attribute ``path`` (``package.module.Name``) or None; a UserError naming ``option`` when the
    module cannot be imported."""
    module_name, attr = path.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{option} {path}: cannot import {module_name} ({e})") from None
    return getattr(module, attr, None)


def _custom_schedule_class(path: str):
    """``--lr_scheduler_type mypkg.MySchedule``: a class/callable ``(base_lrs, **lr_scheduler_args)``
    returning an object with ``lrs(step) -> [lr per group]`` (this port's schedule protocol)."""
    if "." not in path or path.startswith("torch."):
        raise UserError(f"--lr_scheduler_type {path}: torch LR schedulers need a torch optimizer and are not "
                        "available in this port; give a dotted path to a class taking (base_lrs, **kwargs) with a "
                        "method lrs(step), or use --lr_scheduler with --lr_scheduler_args")
    module_name, attr = path.rsplit(".", 1)
    cls = import_dotted(path, "--lr_scheduler_type")
    if cls is None or not callable(cls):
        raise UserError(f"--lr_scheduler_type {path}: {module_name} has no callable {attr}")
    if isinstance(cls, type) and not callable(getattr(cls, "lrs", None)):
        raise UserError(f"--lr_scheduler_type {path}: the class has no method lrs(step) (see library/lr_schedules.py)")
    return cls


def create_lr_schedule(args, base_lrs, max_train_steps, optimizer=None, num_processes: int = 1):
    """kohya's ``get_scheduler_fix`` for this port's optimizers (``args.lr_scheduler`` etc.)."""
    name = args.lr_scheduler
    n = int(max_train_steps) * num_processes
    warmup = resolve_warmup_steps(args.lr_warmup_steps, n)
    decay = resolve_steps(getattr(args, "lr_decay_steps", 0) or 0, n, "--lr_decay_steps")
    kwargs = parse_scheduler_args(getattr(args, "lr_scheduler_args", None))
    timescale = getattr(args, "lr_scheduler_timescale", None)
    min_lr_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)
    num_cycles = getattr(args, "lr_scheduler_num_cycles", 1)
    power = getattr(args, "lr_scheduler_power", 1.0)
    custom = getattr(args, "lr_scheduler_type", "") or ""

    # arguments the chosen schedule would ignore (kohya ignores them silently): stop instead
    uses = {"--lr_decay_steps": ("warmup_stable_decay",), "--lr_scheduler_timescale": ("inverse_sqrt",),
            "--lr_scheduler_min_lr_ratio": ("cosine_with_min_lr", "warmup_stable_decay"),
            "--lr_scheduler_num_cycles": ("cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay"),
            "--lr_scheduler_power": ("polynomial",)}
    given = {"--lr_decay_steps": decay != 0, "--lr_scheduler_timescale": timescale is not None,
             "--lr_scheduler_min_lr_ratio": min_lr_ratio is not None,
             "--lr_scheduler_num_cycles": num_cycles not in (None, 1),
             "--lr_scheduler_power": power not in (None, 1, 1.0)}
    sched_name = "adafactor" if name.startswith("adafactor") else name
    for opt, names in uses.items():
        if given[opt] and (custom or sched_name not in names):
            raise UserError(f"{opt} is used by --lr_scheduler {' / '.join(names)} only, not by "
                            f"{('--lr_scheduler_type ' + custom) if custom else '--lr_scheduler ' + name} "
                            "(kohya ignores it there): remove it")

    opt_type = getattr(args, "optimizer_type", None) or ""
    if opt_type.lower().endswith("schedulefree"):  # train_optimizers.is_schedule_free (not imported: circular)
        # kohya's get_scheduler_fix gives schedule-free optimizers a dummy scheduler: the group lrs stay the
        # initial ones whatever --lr_scheduler says (the averaging weights, and this port's one lr_max for
        # all groups, assume lrs that keep their ratios); what it would ignore stops here instead
        why = (f"--optimizer_type {opt_type} keeps a constant learning rate (kohya replaces the schedule of "
               "schedule-free optimizers); its warmup is --optimizer_args warmup_steps=N")
        if custom:
            raise UserError(f"--lr_scheduler_type {custom} cannot be used: {why}")
        if name != "constant":
            raise UserError(f"--lr_scheduler {name} cannot be used: {why}")
        if warmup:
            raise UserError(f"--lr_warmup_steps {args.lr_warmup_steps} cannot be used: {why}")
        if kwargs:
            raise UserError(f"--lr_scheduler_args cannot be used: {why}")
        return LRSchedule(base_lrs, lambda step: 1.0)

    if custom:
        if warmup:
            raise UserError(f"--lr_scheduler_type {custom} does not take --lr_warmup_steps (kohya: Set None or 0)")
        cls = _custom_schedule_class(custom)
        try:
            schedule = cls(list(base_lrs), **kwargs)
        except TypeError as e:
            raise UserError(f"--lr_scheduler_type {custom}: cannot create it with --lr_scheduler_args "
                            f"{kwargs} ({e})") from None
        if not callable(getattr(schedule, "lrs", None)):
            raise UserError(f"--lr_scheduler_type {custom}: the object it returns has no method lrs(step)")
        return schedule

    if sched_name == "adafactor":
        if warmup:
            raise UserError(f"{name} does not require `num_warmup_steps`. Set None or 0 "
                            "(Adafactor's relative step has its own warmup)")
        if kwargs:
            raise UserError(f"--lr_scheduler_args: adafactor takes no arguments; not {', '.join(sorted(kwargs))}")
        if ":" not in name:
            raise UserError("--lr_scheduler adafactor is the lr Adafactor computes: it needs --optimizer_type "
                            "AdaFactor with relative_step=True")
        try:
            initial_lr = float(name.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--lr_scheduler {name}: expected adafactor:<initial lr>") from None
        if optimizer is not None and not getattr(optimizer, "relative_step", False):
            raise UserError("--lr_scheduler adafactor needs --optimizer_type AdaFactor with relative_step=True")
        return AdafactorSchedule(optimizer, initial_lr, len(base_lrs))

    lam = get_lr_lambda(name, warmup, n, num_cycles, power, num_decay_steps=decay, timescale=timescale,
                        min_lr_ratio=min_lr_ratio, lr_init=args.learning_rate, scheduler_args=kwargs)
    return LRSchedule(base_lrs, lam)
