"""Optimizers (kohya's get_optimizer) and LR schedules (kohya's get_scheduler_fix) against torch:
each optimizer cell, compiled in graph mode, over 4 updates of a matrix, a vector and a 4-D conv
weight in 2 groups at different (changing) lrs equals torch.optim.SGD(nesterov) / lion-pytorch's
formula / transformers' Adafactor; each schedule's lrs equal kohya's torch LambdaLR at every step;
the argument errors; one end-to-end run with AdaFactor."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import assert_close, optimizer_args, ROOT  # noqa: F401  (conftest imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import Parameter, Tensor  # noqa: E402

from library.device_utils import UserError  # noqa: E402
from library import train_optimizers as to  # noqa: E402
from library.run_args import RunArgs  # noqa: E402

SHAPES = [(6, 5), (7,), (4, 3, 3, 3)]
GROUP_OF = [0, 1, 0]
BASE_LRS = [1e-2, 3e-3]
STEPS = 4


_args = optimizer_args


def _data(seed=0):
    rng = np.random.default_rng(seed)
    w0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(STEPS)]
    return w0, grads


def _lrs_at(k, base):
    return [lr * (1.0 - 0.15 * k) for lr in base]  # a host-side schedule: the lrs change every update


def _run_ms(args, w0, grads, change_lrs=True):
    params = [Parameter(Tensor(w.copy()), name=f"p{i}") for i, w in enumerate(w0)]
    groups = [{"params": [params[0], params[2]], "lr": BASE_LRS[0]}, {"params": [params[1]], "lr": BASE_LRS[1]}]
    opt, name, opt_args, lrs = to.create_optimizer(args, groups)
    if isinstance(args, RunArgs):  # as the trainer: kohya's changes to args derived on the run's view
        args.derive(**to.relative_step_overrides(args, groups))
    # create_optimizer orders params by group: p0, p2 | p1
    order = [0, 2, 1]
    schedule = to.create_lr_schedule(args, lrs, STEPS, optimizer=opt)
    reported = []
    for k, g in enumerate(grads):
        opt.set_lrs(_lrs_at(k, lrs) if change_lrs else schedule.lrs(k))
        opt(tuple(Tensor(g[i]) for i in order))
        reported.append(schedule.lrs(k))
    return [p.asnumpy() for p in params], opt, name, opt_args, reported


def _run_torch(make_opt, w0, grads, change_lrs=True, schedule=None):
    tparams = [torch.nn.Parameter(torch.tensor(w.copy())) for w in w0]
    topt = make_opt([{"params": [tparams[0], tparams[2]], "lr": BASE_LRS[0]},
                     {"params": [tparams[1]], "lr": BASE_LRS[1]}])
    sched = schedule(topt) if schedule else None
    reported = []
    for k, g in enumerate(grads):
        if change_lrs:
            for group, lr in zip(topt.param_groups, _lrs_at(k, BASE_LRS)):
                group["lr"] = lr
        for tp, x in zip(tparams, g):
            tp.grad = torch.tensor(x)
        topt.step()
        if sched is not None:
            sched.step()
            reported.append(sched.get_last_lr())
    return [tp.detach().numpy() for tp in tparams], reported


def _compare(ours, ref, w0, what):
    """fp32 parity of the weights, and of the change each made (relative to the largest change): the
    second check fails for an optimizer that does nothing or too little."""
    errs = []
    for i, (a, b, w) in enumerate(zip(ours, ref, w0)):
        assert_close(a, b, 1e-5, what=f"{what} p{i}")
        moved = np.abs(b.astype(np.float64) - w).max()
        err = np.abs((a.astype(np.float64) - w) - (b - w)).max()
        assert moved > 0 and err <= 1e-3 * moved, f"{what} p{i}: update error {err:.3g} vs update {moved:.3g}"
        errs.append(err / moved)
    return max(errs)


# -- optimizers vs torch ---------------------------------------------------------------------------

def test_sgd_nesterov_matches_torch():
    w0, grads = _data(0)
    ours, opt, name, opt_args, _ = _run_ms(_args(optimizer_type="sgdnesterov", optimizer_args=["weight_decay=0.01"]),
                                           w0, grads)
    ref, _ = _run_torch(lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
                        w0, grads)
    _compare(ours, ref, w0, "SGDNesterov")
    # kohya adds momentum=0.9 to the kwargs it writes into ss_optimizer
    assert (name, opt_args) == ("torch.optim.sgd.SGD", "weight_decay=0.01,momentum=0.9")
    assert sorted(p.name for p in opt.state_parameters()) == sorted(
        ["optimizer_lrs", "optimizer_step"] + [f"momentum_buffer.p{i}" for i in range(3)])


def _lion_reference(w0, grads, betas, wd):
    """lion-pytorch's update_fn in numpy."""
    ps = [w.astype(np.float32).copy() for w in w0]
    ms_ = [np.zeros_like(w) for w in ps]
    lrs_of = [0, 1, 0]
    for k, g in enumerate(grads):
        lrs = _lrs_at(k, BASE_LRS)
        for i in range(3):
            lr = np.float32(lrs[lrs_of[i]])
            ps[i] = ps[i] * (np.float32(1) - lr * np.float32(wd))
            update = np.sign(ms_[i] * np.float32(betas[0]) + g[i] * np.float32(1 - betas[0]))
            ps[i] = ps[i] - lr * update
            ms_[i] = ms_[i] * np.float32(betas[1]) + g[i] * np.float32(1 - betas[1])
    return ps


def test_lion_matches_formula():
    w0, grads = _data(1)
    ours, opt, name, opt_args, _ = _run_ms(_args(use_lion_optimizer=True, optimizer_args=["weight_decay=0.1"]),
                                           w0, grads)
    ref = _lion_reference(w0, grads, (0.9, 0.99), 0.1)
    _compare(ours, ref, w0, "Lion")
    assert (name, opt_args) == ("lion_pytorch.lion_pytorch.Lion", "weight_decay=0.1")
    try:
        import lion_pytorch
    except ImportError:
        return
    ref2, _ = _run_torch(lambda g: lion_pytorch.Lion(g, lr=1e-2, weight_decay=0.1), w0, grads)
    _compare(ours, ref2, w0, "Lion vs lion_pytorch")


ADAFACTOR_CASES = {
    # kohya's default: relative_step=True; group lrs dropped, scheduler adafactor:<lr>
    "relative_step": dict(optimizer_args=None, torch=dict(relative_step=True, lr=None)),
    "external_lr": dict(optimizer_args=["relative_step=False", "beta1=0.9", "weight_decay=0.01",
                                        "clip_threshold=0.5"],
                        torch=dict(relative_step=False, beta1=0.9, weight_decay=0.01, clip_threshold=0.5, lr=1e-2)),
    # kohya turns relative_step on for warmup_init
    "warmup_init": dict(optimizer_args=["relative_step=False", "warmup_init=True", "scale_parameter=False"],
                        torch=dict(relative_step=True, warmup_init=True, scale_parameter=False, lr=None)),
}


@pytest.mark.parametrize("case", list(ADAFACTOR_CASES))
def test_adafactor_matches_transformers(case):
    from transformers.optimization import Adafactor, AdafactorSchedule

    spec = ADAFACTOR_CASES[case]
    relative = spec["torch"]["relative_step"]
    w0, grads = _data(2)
    if case == "warmup_init":  # lr 1e-6 x step: small weights, so that fp32 resolves the updates
        w0 = [w * np.float32(1e-3) for w in w0]
    validated = _args(optimizer_type="AdaFactor", optimizer_args=spec["optimizer_args"], learning_rate=1e-3,
                      lr_scheduler="constant_with_warmup" if not relative else "constant", unet_lr=1e-2)
    args = RunArgs(validated)
    ours, opt, name, opt_args, reported = _run_ms(args, w0, grads, change_lrs=not relative)

    def make(groups):
        if relative:  # kohya pops the group lrs
            groups = [{"params": g["params"]} for g in groups]
        return Adafactor(groups, **spec["torch"])

    ref, ref_reported = _run_torch(make, w0, grads, change_lrs=not relative,
                                   schedule=(lambda o: AdafactorSchedule(o, 1e-3)) if relative else None)
    _compare(ours, ref, w0, f"Adafactor {case}")
    assert name == "transformers.optimization.Adafactor"
    if relative:
        # kohya's side effects (derived; the validated namespace is untouched) and the reported lrs
        # (transformers' AdafactorSchedule.get_last_lr)
        assert args.lr_scheduler == "adafactor:0.001" and args.learning_rate is None and args.unet_lr is None
        assert validated.lr_scheduler == "constant" and validated.learning_rate == 1e-3 and validated.unet_lr == 1e-2
        assert opt_args.startswith("relative_step=True")
        for k, (a, b) in enumerate(zip(reported, ref_reported)):
            np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=f"reported lr at update {k + 1}")
    names = [p.name for p in opt.state_parameters()]
    assert len(set(names)) == len(names) and "exp_avg_sq_row.p2" in names and "exp_avg_sq.p1" in names


def test_custom_optimizer_class_and_state_parameters():
    w0, grads = _data(3)
    ours, opt, name, opt_args, _ = _run_ms(_args(optimizer_type="test_train_optimizers.HalfLion",
                                                 optimizer_args=["betas=0.9,0.99"]), w0, grads)
    assert isinstance(opt, HalfLion) and name == "test_train_optimizers.HalfLion" and opt_args == "betas=(0.9, 0.99)"
    _compare(ours, _lion_reference(w0, grads, (0.9, 0.99), 0.0), w0, "custom Lion")
    # AdamW's state for --save_state: moments, step counter, lrs, uniquely named
    params = [Parameter(Tensor(w.copy()), name=f"q{i}") for i, w in enumerate(w0)]
    adamw = to.AdamW(params, GROUP_OF, BASE_LRS)
    names = sorted(p.name for p in adamw.state_parameters())
    assert names == sorted(["optimizer_lrs", "optimizer_step"] + [f"exp_avg.q{i}" for i in range(3)]
                           + [f"exp_avg_sq.q{i}" for i in range(3)])
    assert all(p.dtype == ms.float32 for p in adamw.state_parameters())


class HalfLion(to.Lion):
    """A user optimizer through a dotted --optimizer_type (this port's protocol)."""


class NotAnOptimizer:
    pass


# -- schedules vs kohya's get_scheduler_fix (transformers / diffusers LambdaLR) -----------------------

def _kohya_schedule(topt, name, warmup, n, decay=0, num_cycles=1, power=1.0, timescale=None, min_lr_ratio=None,
                    kwargs=None):
    """kohya's get_scheduler_fix dispatch with transformers' and diffusers' schedule functions."""
    from diffusers.optimization import get_piecewise_constant_schedule
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    kwargs = kwargs or {}
    if name == "piecewise_constant":
        return get_piecewise_constant_schedule(topt, **kwargs)
    fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    if name == "constant":
        return fn(topt, **kwargs)
    if name == "constant_with_warmup":
        return fn(topt, num_warmup_steps=warmup, **kwargs)
    if name == "inverse_sqrt":
        return fn(topt, num_warmup_steps=warmup, timescale=timescale, **kwargs)
    if name == "cosine_with_restarts":
        return fn(topt, num_warmup_steps=warmup, num_training_steps=n, num_cycles=num_cycles, **kwargs)
    if name == "polynomial":
        return fn(topt, num_warmup_steps=warmup, num_training_steps=n, power=power, **kwargs)
    if name == "cosine_with_min_lr":
        return fn(topt, num_warmup_steps=warmup, num_training_steps=n, num_cycles=num_cycles / 2,
                  min_lr_rate=min_lr_ratio, **kwargs)
    if name in ("linear", "cosine"):
        return fn(topt, num_warmup_steps=warmup, num_training_steps=n, **kwargs)
    assert name == "warmup_stable_decay"
    return fn(topt, num_warmup_steps=warmup, num_stable_steps=n - warmup - decay, num_decay_steps=decay,
              num_cycles=num_cycles / 2, min_lr_ratio=min_lr_ratio or 0.0, **kwargs)


N = 40
# case -> (--lr_scheduler, our args, kohya's resolved values)
SCHEDULE_CASES = {
    "constant": ("constant", dict(), dict()),
    "constant_with_warmup": ("constant_with_warmup", dict(lr_warmup_steps="10%"), dict(warmup=4)),
    "linear": ("linear", dict(lr_warmup_steps="0.25"), dict(warmup=10)),
    "cosine": ("cosine", dict(lr_warmup_steps="5", lr_scheduler_args=["num_cycles=1.5"]),
               dict(warmup=5, kwargs={"num_cycles": 1.5})),
    "cosine_with_restarts": ("cosine_with_restarts", dict(lr_warmup_steps="3", lr_scheduler_num_cycles=3),
                             dict(warmup=3, num_cycles=3)),
    "polynomial": ("polynomial", dict(lr_warmup_steps="4", lr_scheduler_power=2.0, lr_scheduler_args=["lr_end=1e-4"]),
                   dict(warmup=4, power=2.0, kwargs={"lr_end": 1e-4})),
    "inverse_sqrt": ("inverse_sqrt", dict(lr_warmup_steps="6"), dict(warmup=6)),
    "inverse_sqrt_timescale": ("inverse_sqrt", dict(lr_warmup_steps="6", lr_scheduler_timescale=20),
                               dict(warmup=6, timescale=20)),
    "cosine_with_min_lr": ("cosine_with_min_lr",
                           dict(lr_warmup_steps="4", lr_scheduler_min_lr_ratio=0.1, lr_scheduler_num_cycles=2),
                           dict(warmup=4, min_lr_ratio=0.1, num_cycles=2)),
    "warmup_stable_decay": ("warmup_stable_decay",
                            dict(lr_warmup_steps="5", lr_decay_steps="0.25", lr_scheduler_min_lr_ratio=0.05,
                                 lr_scheduler_args=["decay_type='linear'", "warmup_type=cosine"]),
                            dict(warmup=5, decay=10, min_lr_ratio=0.05,
                                 kwargs={"decay_type": "linear", "warmup_type": "cosine"})),
    "warmup_stable_decay_default": ("warmup_stable_decay", dict(lr_warmup_steps="5", lr_decay_steps="20%"),
                                    dict(warmup=5, decay=8)),
    "piecewise_constant": ("piecewise_constant", dict(lr_scheduler_args=["step_rules=1:10,0.5:20,0.1:30,0.05"]),
                           dict(kwargs={"step_rules": "1:10,0.5:20,0.1:30,0.05"})),
}


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_schedule_matches_kohya(case):
    name, ours_kw, ref_kw = SCHEDULE_CASES[case]
    ref_kw = dict(ref_kw)
    sched = to.create_lr_schedule(_args(lr_scheduler=name, learning_rate=1e-3, **ours_kw), [1e-3, 4e-4], N)
    p = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    topt = torch.optim.SGD([{"params": [p[0]], "lr": 1e-3}, {"params": [p[1]], "lr": 4e-4}], lr=1e-3)
    ref = _kohya_schedule(topt, name, ref_kw.pop("warmup", 0), N, **ref_kw)
    values = []
    for step in range(N + 3):
        expect = ref.get_last_lr()
        got = sched.lrs(step)
        np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-15, err_msg=f"{case} step {step}")
        values.append(got[0])
        topt.step()
        ref.step()
    assert (len(set(values)) > 3) == (case != "constant"), values


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(optimizer_type="AdamW8bit"), "--optimizer_type AdamW8bit is not available"),
    (dict(optimizer_type="PagedAdamW8bit"), "--optimizer_type PagedAdamW8bit is not available"),
    (dict(optimizer_type="PagedLion8bit"), "--optimizer_type PagedLion8bit is not available"),
    (dict(optimizer_type="Lion8bit"), "--optimizer_type Lion8bit is not available"),
    (dict(optimizer_type="DAdaptLion"), "--optimizer_type DAdaptLion is not available"),
    (dict(optimizer_type="RAdamScheduleFree"), "--optimizer_type RAdamScheduleFree is not available"),
    (dict(optimizer_type="PagedAdamW"), "--optimizer_type PagedAdamW is not available"),
    (dict(optimizer_type="RAdam"), "--optimizer_type RAdam is not available"),
    (dict(use_8bit_adam=True), "--use_8bit_adam is not available"),
    (dict(use_lion_optimizer=True, optimizer_type="AdamW"), "both option use_lion_optimizer and optimizer_type"),
    (dict(optimizer_type="no_such_pkg.Opt"), "cannot import no_such_pkg"),
    (dict(optimizer_type="test_train_optimizers.NotAnOptimizer"), "not an optimizer cell of this port"),
    (dict(optimizer_type="test_train_optimizers.Missing"), "has no class Missing"),
    (dict(optimizer_args=["amsgrad=True"]), "AdamW takes betas, eps, weight_decay; not amsgrad"),
    (dict(optimizer_type="Lion", optimizer_args=["use_triton=True"]), "Lion takes betas, weight_decay"),
    (dict(optimizer_type="sgdnesterov", optimizer_args=["momentum=0"]), "Nesterov momentum requires a momentum"),
    (dict(optimizer_type="adafactor", optimizer_args=["lr=1"]), "AdaFactor takes eps, clip_threshold"),
    (dict(optimizer_type="adafactor", optimizer_args=["relative_step=false"]),
     "relative_step for AdaFactor must be True or False, got 'false'"),
    (dict(optimizer_args=["betas=0.9"]), "betas for AdamW must be two numbers"),
    (dict(optimizer_args=["weight_decay=x"]), "weight_decay for AdamW must be a number"),
    (dict(optimizer_type="adafactor", lr_warmup_steps="10"), "adafactor:0.01 does not require `num_warmup_steps`"),
    (dict(optimizer_type="adafactor", optimizer_args=["relative_step=False"], lr_scheduler="adafactor"),
     "needs --optimizer_type AdaFactor with relative_step=True"),
    (dict(lr_scheduler="adafactor"), "adafactor scheduler must be used with Adafactor optimizer"),
    (dict(lr_scheduler="constant", lr_warmup_steps="5"), "constant does not require `num_warmup_steps`"),
    (dict(lr_scheduler="cosine", lr_scheduler_args=["T_max=100"]), "cosine takes num_cycles; not T_max"),
    (dict(lr_scheduler="linear", lr_scheduler_args=["x=1"]), "linear takes no arguments; not x"),
    (dict(lr_scheduler="cosine", lr_decay_steps="10"), "--lr_decay_steps is used by --lr_scheduler warmup_stable_decay"),
    (dict(lr_scheduler="cosine", lr_scheduler_num_cycles=3), "--lr_scheduler_num_cycles is used by"),
    (dict(lr_scheduler="linear", lr_scheduler_timescale=5), "--lr_scheduler_timescale is used by"),
    (dict(lr_scheduler="cosine_with_min_lr"), "needs --lr_scheduler_min_lr_ratio"),
    (dict(lr_scheduler="piecewise_constant"), "needs --lr_scheduler_args step_rules="),
    (dict(lr_scheduler="piecewise_constant", lr_scheduler_args=["step_rules=1:x,0.1"]), "cannot parse"),
    (dict(lr_scheduler="warmup_stable_decay", lr_warmup_steps="60", lr_decay_steps="50"), "exceed the training steps"),
    (dict(lr_scheduler="reduce_lr_on_plateau"), "not available in this port"),
    (dict(lr_scheduler="polynomial", lr_scheduler_args=["lr_end=0.1"]), "must be smaller than the initial lr"),
    (dict(lr_scheduler_type="CosineAnnealingLR"), "torch LR schedulers need a torch optimizer"),
    (dict(lr_scheduler_type="no_such_pkg.Sched"), "cannot import no_such_pkg"),
    (dict(lr_scheduler_type="test_train_optimizers.HalfSchedule", lr_warmup_steps="3"), "does not take --lr_warmup"),
    (dict(lr_warmup_steps="1.5"), "--lr_warmup_steps must be an int"),
])
def test_argument_errors_at_start(kw, msg):
    with pytest.raises(UserError, match=None) as e:
        to.check_optimizer_args(_args(**kw))
    assert msg in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


class HalfSchedule:
    """A user schedule through --lr_scheduler_type: half the base lrs after ``after`` steps."""

    def __init__(self, base_lrs, after=5):
        self.base_lrs, self.after = base_lrs, after

    def lrs(self, step):
        return [lr * (0.5 if step >= self.after else 1.0) for lr in self.base_lrs]


def test_custom_schedule_and_checks_do_not_mutate_args():
    args = _args(lr_scheduler_type="test_train_optimizers.HalfSchedule", lr_scheduler_args=["after=3"])
    to.check_optimizer_args(args)
    sched = to.create_lr_schedule(args, [1e-3, 2e-3], 10)
    assert sched.lrs(2) == [1e-3, 2e-3] and sched.lrs(3) == [5e-4, 1e-3]
    args = _args(optimizer_type="AdaFactor", learning_rate=1e-3)
    to.check_optimizer_args(args)
    assert args.lr_scheduler == "constant" and args.learning_rate == 1e-3  # only create_optimizer changes them


# -- end to end --------------------------------------------------------------------------------------

def test_adafactor_trains_end_to_end(tmp_path):
    """sdxl_train_network.py --optimizer_type AdaFactor (kohya's relative step): trains, reports the lr
    Adafactor computed, and writes kohya's metadata (ss_optimizer, ss_lr_scheduler adafactor:<lr>)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_tiny_train_demo as demo
    from library.lora_file import load_state_dict_file

    ckpt = str(tmp_path / "tiny.safetensors")
    demo.write_checkpoint(ckpt, seed=0, small=True)
    images = tmp_path / "img"
    names = demo.write_images(str(images), 2, [(64, 64)], seed=2, captions=False)
    # kohya's third dataset method: fine-tuning with a metadata file (keys without extension)
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({n: {"caption": f"shq {n.split('_', 1)[1]}", "tags": "simple"} for n in names}))
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 1\n[[datasets.subsets]]\n"
                       f"image_dir = '{images}'\nmetadata_file = '{metadata}'\n")
    out = tmp_path / "out"
    env = dict(os.environ, GLOG_v="3")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sdxl_train_network.py"),
                           "--pretrained_model_name_or_path", ckpt, "--dataset_config", str(dataset),
                           "--output_dir", str(out), "--output_name", "af", "--network_module", "networks.lora",
                           "--network_dim", "4", "--network_train_unet_only", "--optimizer_type", "AdaFactor",
                           "--learning_rate", "1e-3", "--max_grad_norm", "0", "--max_train_steps", "2",
                           "--max_data_loader_n_workers", "0", "--seed", "1"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "learning rate is used as initial_lr" in proc.stderr
    sd, md = load_state_dict_file(str(out / "af.safetensors"))[:2]
    assert md["ss_optimizer"] == "transformers.optimization.Adafactor(relative_step=True)", md["ss_optimizer"]
    assert md["ss_lr_scheduler"] == "adafactor:0.001" and md["ss_learning_rate"] == "None"
    assert md["ss_num_train_images"] == "2" and f"metadata_file: {metadata}" in proc.stderr
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    with open(out / "af_loss.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    # relative step: min(1e-2, 1/sqrt(step)) x max(1e-3, RMS of the first LoRA weight): not the 1e-3 given
    assert len(lrs) == 2 and all(0 < lr < 1e-2 for lr in lrs) and lrs[0] != 1e-3, lrs


@pytest.mark.parametrize("opt_args", [dict(optimizer_type="AdamW"), dict(optimizer_type="SGDNesterov"),
                                      dict(optimizer_type="Lion"),
                                      dict(optimizer_type="AdaFactor", optimizer_args=["relative_step=False"]),
                                      dict(optimizer_type="AdaFactor", optimizer_args=["beta1=0.9"])])
def test_parameterwise_update_equals_the_one_graph_update(opt_args):
    """The segmented step's update (chunks of same-shape parameters per small graph, the gradient norm on
    the host) moves every parameter and state as ApplyGrads (clip + the optimizer in one graph) does:
    with chunks of at most 3, the four (6, 5) parameters run as a full chunk and a remainder, each
    chunk mixing learning-rate groups."""
    from library.train_step import ParameterwiseUpdate, _step_cells

    rng = np.random.default_rng(5)
    shapes = [SHAPES[0]] * 4 + [SHAPES[1]] * 2 + [SHAPES[2]]
    w0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(STEPS)]
    first_group = [0, 2, 3, 5]
    results = []
    for kind in ("one graph", "parameterwise"):
        params = [Parameter(Tensor(w.copy()), name=f"p{i}") for i, w in enumerate(w0)]
        groups = [{"params": [params[i] for i in first_group], "lr": BASE_LRS[0]},
                  {"params": [p for i, p in enumerate(params) if i not in first_group], "lr": BASE_LRS[1]}]
        order = [i for i in first_group] + [i for i in range(len(params)) if i not in first_group]
        opt = to.create_optimizer(_args(**opt_args), groups)[0]
        update = (_step_cells()["ApplyGrads"](opt, 0.5) if kind == "one graph"
                  else ParameterwiseUpdate(opt, 0.5, max_chunk=3))
        if kind == "parameterwise":
            assert len(update.items) == 4 and len(update.templates) == 4, (len(update.items), len(update.templates))
        for k, g in enumerate(grads):
            opt.set_lrs(_lrs_at(k, BASE_LRS))
            update(Tensor(np.float32(1.0)), ms.mutable(tuple(Tensor(g[i] * 3) for i in order)))  # clipped
        results.append([p.asnumpy() for p in params] + [s.asnumpy() for s in opt.state_parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, 1e-6, what=f"{opt_args} tensor {i}")
    assert not np.allclose(results[0][0], w0[0])
