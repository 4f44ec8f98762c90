"""The adaptive optimizers (library/train_optimizers_adaptive.py) against the torch packages kohya takes
them from: pytorch_optimizer 3.9.0's CAME, prodigyopt 1.1.2's Prodigy, dadaptation 3.2's DAdaptAdam,
schedulefree 1.4.1's AdamWScheduleFree (with its train()/eval()). Each compiled cell, created through
``create_optimizer`` from kohya's --optimizer_type / --optimizer_args where the trainer takes it, runs 5
updates of a factored-size matrix, a vector, a 4-D conv weight and a zero-initialised matrix (a LoRA up
weight) in 2 groups, with weight decay and the package's default betas, from the same weights and
gradients as the reference; every weight must match to 1e-5 of its tensor's scale. The segmented
trainer's update path (ParameterwiseUpdate: chunk graphs, the two-phase sums) must equal the one-graph
update; bad --optimizer_args stop with one line."""

import numpy as np
import pytest
import torch

from conftest import optimizer_args, ROOT  # noqa: F401  (conftest imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import Parameter, Tensor  # noqa: E402

from library.device_utils import UserError  # noqa: E402
from library import train_optimizers as to  # noqa: E402
from library import train_optimizers_adaptive as ta  # noqa: E402

SHAPES = [(40, 24), (7,), (4, 3, 3, 3), (16, 8)]
GROUPS = [[0, 2], [1, 3]]
STEPS = 5
TOL = 1e-5


_args = optimizer_args


def _data(seed=0):
    rng = np.random.default_rng(seed)
    w0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    w0[3][:] = 0.0  # LoRA's up weights start at zero (Prodigy keeps no p0 copy of them)
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(STEPS)]
    return w0, grads


def _torch_ref(make, w0, grads, lrs, between=None):
    tparams = [torch.nn.Parameter(torch.tensor(w.copy())) for w in w0]
    topt = make([{"params": [tparams[i] for i in g], "lr": lr} for g, lr in zip(GROUPS, lrs)])
    if hasattr(topt, "train"):
        topt.train()  # kohya's get_optimizer does so
    for k, g in enumerate(grads):
        for tp, x in zip(tparams, g):
            tp.grad = torch.tensor(x)
        topt.step()
        if between is not None:
            between(k, topt)
    return [tp.detach().numpy().copy() for tp in tparams]


def _params(w0, prefix="p"):
    params = [Parameter(Tensor(w.copy()), name=f"{prefix}{i}") for i, w in enumerate(w0)]
    return params, [{"params": [params[i] for i in g], "lr": lr} for g, lr in zip(GROUPS, [None, None])]


def _ms_run(opt_type, optimizer_args, w0, grads, lrs):
    params = [Parameter(Tensor(w.copy()), name=f"p{i}") for i, w in enumerate(w0)]
    groups = [{"params": [params[i] for i in g], "lr": lr} for g, lr in zip(GROUPS, lrs)]
    opt, name, args_str, _ = to.create_optimizer(_args(optimizer_type=opt_type, optimizer_args=optimizer_args,
                                                       learning_rate=lrs[0]), groups)
    order = [i for g in GROUPS for i in g]  # create_optimizer orders the parameters by group
    for g in grads:
        opt(tuple(Tensor(g[i]) for i in order))
    return [p.asnumpy() for p in params], opt, name, args_str


def _errors(ours, ref, w0, what):
    """Max error of each tensor relative to its scale; the reference must have moved every tensor."""
    errs = []
    for i, (a, b, w) in enumerate(zip(ours, ref, w0)):
        scale = np.abs(b).max()
        err = float(np.abs(a.astype(np.float64) - b).max() / scale)
        assert np.abs(b - w).max() > 0, f"{what} p{i}: the reference did not move it"
        assert err <= TOL, f"{what} p{i} {SHAPES[i]}: error {err:.3g} of the tensor's scale"
        errs.append(err)
    return errs


def _came(**kw):
    import pytorch_optimizer
    return lambda groups: pytorch_optimizer.CAME(groups, **kw)


def _prodigy(**kw):
    import prodigyopt
    return lambda groups: prodigyopt.Prodigy(groups, **kw)


def _dadapt(**kw):
    import dadaptation
    return lambda groups: dadaptation.DAdaptAdam(groups, **kw)


def _schedulefree(**kw):
    import schedulefree
    return lambda groups: schedulefree.AdamWScheduleFree(groups, **kw)


# (--optimizer_type, --optimizer_args, group lrs, the reference)
CASES = {
    "came": ("pytorch_optimizer.CAME", ["weight_decay=0.1"], [1e-2, 3e-3], _came(weight_decay=0.1)),
    "came_ams_fixed_decay": ("CAME", ["weight_decay=0.1", "ams_bound=True", "fixed_decay=True",
                                      "betas=0.8,0.99,0.999"], [1e-2, 1e-2],
                             _came(weight_decay=0.1, ams_bound=True, fixed_decay=True, betas=(0.8, 0.99, 0.999))),
    "came_coupled": ("CAME", ["weight_decay=0.1", "weight_decouple=False", "maximize=True"], [2e-3, 2e-3],
                     _came(weight_decay=0.1, weight_decouple=False, maximize=True)),
    "prodigy": ("Prodigy", ["weight_decay=0.1"], [1.0, 1.0], _prodigy(weight_decay=0.1)),
    "prodigy_coupled_bc": ("prodigy", ["weight_decay=0.1", "decouple=False", "use_bias_correction=True",
                                       "safeguard_warmup=True", "d_coef=2.0", "d0=1e-5"], [1.0, 1.0],
                           _prodigy(weight_decay=0.1, decouple=False, use_bias_correction=True,
                                    safeguard_warmup=True, d_coef=2.0, d0=1e-5)),
    "prodigy_frozen_group_no_m": ("Prodigy", ["weight_decay=0.1", "betas=0.0,0.99", "growth_rate=1.5"], [1.0, 0.0],
                                  _prodigy(weight_decay=0.1, betas=(0.0, 0.99), growth_rate=1.5)),
    "dadaptadam": ("DAdaptAdam", ["weight_decay=0.1"], [1.0, 1.0], _dadapt(weight_decay=0.1)),
    "dadaptadam_decoupled_bc": ("dadaptadam", ["weight_decay=0.1", "decouple=True", "use_bias_correction=True",
                                               "growth_rate=2.0"], [0.5, 0.5],
                                _dadapt(weight_decay=0.1, decouple=True, use_bias_correction=True, growth_rate=2.0)),
    # y (the training point) after each step; its eval()/train() are test_schedule_free_adamw_and_its_eval_weights'
    "adamwschedulefree": ("AdamWScheduleFree", ["weight_decay=0.1", "warmup_steps=2"], [1e-2, 3e-3],
                          _schedulefree(weight_decay=0.1, warmup_steps=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_package(case):
    opt_type, opt_args, lrs, make = CASES[case]
    w0, grads = _data()
    ours, opt, name, args_str = _ms_run(opt_type, opt_args, w0, grads, lrs)
    ref = _torch_ref(make, w0, grads, lrs)
    errs = _errors(ours, ref, w0, case)
    print(case, "max error of the tensor's scale per tensor:", ", ".join(f"{e:.2g}" for e in errs))
    assert name == ta.SPECS[to._check_type(opt_type)][1]
    assert args_str.startswith("weight_decay=0.1")  # kohya's ss_optimizer arguments: key=parsed value
    assert len({p.name for p in opt.state_parameters()}) == len(opt.state_parameters())


def test_d_estimate_is_state():
    """Prodigy's d (and its sums) are Parameters of the optimizer's state, which resume saves and loads: a
    copy of them continues the run exactly."""
    w0, grads = _data(1)
    full, opt, _, _ = _ms_run("Prodigy", None, w0, grads, [1.0, 1.0])
    names = {p.name for p in opt.state_parameters()}
    assert {"optimizer_d", "optimizer_d_max", "optimizer_d_numerator", "optimizer_k"} <= names
    ds = []
    _torch_ref(_prodigy(), w0, grads, [1.0, 1.0], lambda k, topt: ds.append(topt.param_groups[0]["d"]))
    assert abs(float(opt.d.asnumpy()) - ds[-1]) <= 1e-6 * ds[-1], (float(opt.d.asnumpy()), ds)
    # 3 steps, the state copied into a fresh optimizer, 2 more steps
    params, groups = _params(w0, "r")
    for g, lr in zip(groups, [1.0, 1.0]):
        g["lr"] = lr
    first = to.create_optimizer(_args(optimizer_type="Prodigy", learning_rate=1.0), groups)[0]
    order = [i for g in GROUPS for i in g]
    for g in grads[:3]:
        first(tuple(Tensor(g[i]) for i in order))
    second = to.create_optimizer(_args(optimizer_type="Prodigy", learning_rate=1.0), groups)[0]
    for a, b in zip(first.state_parameters(), second.state_parameters()):
        b.set_data(Tensor(a.asnumpy()))
    for g in grads[3:]:
        second(tuple(Tensor(g[i]) for i in order))
    for a, b in zip(params, full):
        np.testing.assert_allclose(a.asnumpy(), b, rtol=0, atol=1e-7 * np.abs(b).max())


def test_schedule_free_adamw_and_its_eval_weights():
    """AdamWScheduleFree's cell: y after each step, and x from eval() (what the trainer samples, validates
    and saves), then train() back to y, as schedulefree's."""
    import schedulefree

    w0, grads = _data(2)
    lrs = [1e-2, 3e-3]
    kw = dict(weight_decay=0.1, warmup_steps=3)
    params = [Parameter(Tensor(w.copy()), name=f"s{i}") for i, w in enumerate(w0)]
    order = [i for g in GROUPS for i in g]
    group_of = [gi for gi, g in enumerate(GROUPS) for _ in g]
    opt = ta.AdamWScheduleFree([params[i] for i in order], group_of, lrs, **kw)
    opt.eval()  # before any step: nothing to switch (the reference's `if 'z' in state`)
    opt.train()
    evals = {}

    def eval_and_back(k, topt):
        if k in (1, STEPS - 1):
            topt.eval()
            evals[k] = [p.detach().numpy().copy() for g in topt.param_groups for p in g["params"]]
            if k != STEPS - 1:
                topt.train()

    ref = _torch_ref(lambda groups: schedulefree.AdamWScheduleFree(groups, **kw), w0, grads, lrs, eval_and_back)
    ref_eval = {k: [v[order.index(i)] for i in range(len(w0))] for k, v in evals.items()}
    for k, g in enumerate(grads):
        opt(tuple(Tensor(g[i]) for i in order))
        if k in (1, STEPS - 1):
            opt.eval()
            opt.eval()  # twice: the second does nothing, as the reference's
            errs = _errors([p.asnumpy() for p in params], ref_eval[k], w0, f"schedule-free eval after step {k + 1}")
            print("AdamWScheduleFree eval() after step", k + 1, ", ".join(f"{e:.2g}" for e in errs))
            if k != STEPS - 1:
                opt.train()
    assert float(opt.train_mode.asnumpy()) == 0.0
    opt.train()
    back = [p.asnumpy() for p in params]
    x = ref_eval[STEPS - 1]
    assert not np.allclose(back[0], x[0])  # train() moved them back to y
    assert "optimizer_train_mode" in {p.name for p in opt.state_parameters()}


@pytest.mark.parametrize("opt_type,opt_args", [("Prodigy", ["weight_decay=0.1"]),
                                               ("DAdaptAdam", ["weight_decay=0.1", "decouple=True"]),
                                               ("CAME", ["weight_decay=0.1", "ams_bound=True"]),
                                               ("AdamWScheduleFree", ["weight_decay=0.1", "warmup_steps=2"])])
def test_parameterwise_update_equals_the_one_graph_update(opt_type, opt_args):
    """The segmented trainer's update (library.train_step.ParameterwiseUpdate: same-shape chunks of at most
    3 per graph; for Prodigy / D-Adaptation the chunk sums, one graph for d, then the update chunks), with
    clipping, moves every weight and state as ApplyGrads (clip + the optimizer in one graph) does."""
    from library.train_step import ParameterwiseUpdate, _step_cells

    rng = np.random.default_rng(5)
    shapes = [SHAPES[0]] * 4 + [SHAPES[1]] * 2 + [SHAPES[2], SHAPES[3]]
    w0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    first_group = [0, 2, 3, 5]
    lr = 1.0 if opt_type in ("Prodigy", "DAdaptAdam") else 1e-2
    results = []
    for kind in ("one graph", "parameterwise"):
        params = [Parameter(Tensor(w.copy()), name=f"p{i}") for i, w in enumerate(w0)]
        groups = [{"params": [params[i] for i in first_group], "lr": lr},
                  {"params": [p for i, p in enumerate(params) if i not in first_group], "lr": lr}]
        order = first_group + [i for i in range(len(params)) if i not in first_group]
        opt = to.create_optimizer(_args(optimizer_type=opt_type, optimizer_args=opt_args, learning_rate=lr),
                                  groups)[0]
        update = (_step_cells()["ApplyGrads"](opt, 0.5) if kind == "one graph"
                  else ParameterwiseUpdate(opt, 0.5, max_chunk=3))
        for g in grads:
            update(Tensor(np.float32(1.0)), ms.mutable(tuple(Tensor(g[i] * 3) for i in order)))  # clipped
        results.append([p.asnumpy() for p in params] + [s.asnumpy() for s in opt.state_parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        scale = max(np.abs(a).max(), 1e-30)
        assert np.abs(a - b).max() <= 1e-6 * scale, f"{opt_type} tensor {i}: {np.abs(a - b).max()} of {scale}"
    assert not np.allclose(results[0][0], w0[0])


@pytest.mark.parametrize("kw,msg", [
    (dict(optimizer_type="Prodigy", optimizer_args=["slice_p=11"]), "slice_p for Prodigy: only 1"),
    (dict(optimizer_type="Prodigy", optimizer_args=["fsdp_in_use=True"]), "FSDP is torch-only"),
    (dict(optimizer_type="Prodigy", optimizer_args=["amsgrad=True"]), "Prodigy takes betas, beta3, eps"),
    (dict(optimizer_type="Prodigy", optimizer_args=["betas=0.9,1.5"]), "betas for Prodigy must be in [0, 1)"),
    (dict(optimizer_type="Prodigy", learning_rate=0.0), "Prodigy needs --learning_rate > 0"),
    (dict(optimizer_type="DAdaptAdam", optimizer_args=["decouple=1"]), "decouple for DAdaptAdam must be True or"),
    (dict(optimizer_type="DAdaptAdam", optimizer_args=["d0=0"]), "d0 for DAdaptAdam must be > 0"),
    (dict(optimizer_type="DAdaptation"), "DAdaptAdamPreprint, not ported"),
    (dict(optimizer_type="DAdaptLion"), "--optimizer_type DAdaptLion is not available"),
    (dict(optimizer_type="CAME", optimizer_args=["betas=0.9,0.999"]), "betas for CAME must be three numbers"),
    (dict(optimizer_type="pytorch_optimizer.CAME", optimizer_args=["eps=1e-8"]), "CAME takes betas, weight_decay"),
    (dict(optimizer_type="RAdamScheduleFree"), "--optimizer_type RAdamScheduleFree is not available"),
    # kohya gives schedule-free optimizers a constant lr whatever the scheduler arguments say: they stop here
    (dict(optimizer_type="AdamWScheduleFree", lr_scheduler="cosine"),
     "--lr_scheduler cosine cannot be used: --optimizer_type AdamWScheduleFree keeps a constant learning rate"),
    (dict(optimizer_type="AdamWScheduleFree", lr_warmup_steps="10"), "--lr_warmup_steps 10 cannot be used"),
    (dict(optimizer_type="schedulefree.AdamWScheduleFree", lr_scheduler_type="mypkg.Sched"),
     "--lr_scheduler_type mypkg.Sched cannot be used"),
    (dict(optimizer_type="AdamWScheduleFree", optimizer_args=["warmup_steps=x"]),
     "warmup_steps for AdamWScheduleFree must be a number"),
])
def test_argument_errors_at_start(kw, msg):
    with pytest.raises(UserError) as e:
        to.check_optimizer_args(_args(**kw))
    assert msg in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_group_lrs_must_agree_for_d_adaptation():
    """prodigyopt / dadaptation raise at their first step when two groups have different non-zero lrs
    (kohya's --unet_lr / --text_encoder_lr): the cell stops when it is created, with the lrs named."""
    w0, _ = _data()
    params = [Parameter(Tensor(w.copy()), name=f"g{i}") for i, w in enumerate(w0)]
    groups = [{"params": params[:2], "lr": 1.0}, {"params": params[2:], "lr": 0.5}]
    with pytest.raises(UserError, match="one learning rate for all parameter groups"):
        to.create_optimizer(_args(optimizer_type="Prodigy", learning_rate=1.0), groups)


def test_schedule_free_lr_is_constant_and_its_train_eval_are_the_trainers():
    """kohya's get_scheduler_fix gives a schedule-free optimizer a dummy scheduler (the group lrs as given, at
    every step; warmup is the optimizer's warmup_steps), and get_optimizer_train_eval_fn its train()/eval()
    (no-ops for the other optimizers)."""
    args = _args(optimizer_type="AdamWScheduleFree", optimizer_args=["warmup_steps=3"])
    to.check_optimizer_args(args)
    schedule = to.create_lr_schedule(args, [1e-2, 3e-3], 10)
    assert [schedule.lrs(k) for k in (0, 1, 5, 9)] == [[1e-2, 3e-3]] * 4
    w0, grads = _data(3)
    params, groups = _params(w0, "t")
    for g, lr in zip(groups, [1e-2, 3e-3]):
        g["lr"] = lr
    opt = to.create_optimizer(args, groups)[0]
    train_fn, eval_fn = to.get_optimizer_train_eval_fn(opt, args)
    order = [i for g in GROUPS for i in g]
    for g in grads[:2]:  # after one step y = z = x (the first step's averaging weight is 1)
        opt(tuple(Tensor(g[i]) for i in order))
    y = [p.asnumpy().copy() for p in params]
    eval_fn()
    assert float(opt.train_mode.asnumpy()) == 0.0 and not np.allclose(params[0].asnumpy(), y[0])
    train_fn()
    assert float(opt.train_mode.asnumpy()) == 1.0
    for a, b in zip(params, y):  # y -> x -> y: the same up to rounding
        np.testing.assert_allclose(a.asnumpy(), b, rtol=0, atol=1e-6 * np.abs(b).max())
    adamw_args = _args(optimizer_type="AdamW")
    adamw = to.create_optimizer(adamw_args, [dict(g, lr=1e-2) for g in _params(w0, "a")[1]])[0]
    train_fn, eval_fn = to.get_optimizer_train_eval_fn(adamw, adamw_args)
    assert train_fn() is None and eval_fn() is None
