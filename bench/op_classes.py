"""Where a training step's kernel time goes, by op class, for MindSpore's CPU profiler output and for
``torch.profiler``: convolution, matmul, attention, norms, optimizer update, elementwise (the rest).

Each framework has a rule list, tried in order; a rule names the class and the op-type / scope
substrings that select it (the first match wins, so attention's batched matmuls are not counted as
matmul). MindSpore: ``cpu_op_detail_info_*.csv`` (``MS_PROFILER_OPTIONS`` set for the run), op type
and full scope name per op, total milliseconds over the run. torch: ``key_averages()`` self CPU time
(an op's time without the ops it calls), microseconds. The MindSpore optimizer update is not told apart
by scope; the bench moves the step's measured update time out of elementwise.
"""
import csv
import glob
import os

CLASSES = ("convolution", "matmul", "attention", "norms", "optimizer update", "elementwise")

# (class, op-type substrings, scope substrings): an op matches when its type contains one of the first
# or its scope one of the second
MINDSPORE_RULES = (  # the update graphs' ops carry no scope of their own: they land in elementwise
    ("attention", ("Softmax", "FlashAttention"), ("ScaledDotProductAttention", "SoftmaxAttend")),
    ("convolution", ("Conv2D", "Conv2d", "Conv3D"), ()),
    ("matmul", ("MatMul", "Dense"), ()),
    ("norms", ("GroupNorm", "LayerNorm"), ("-GroupNorm/", "-LayerNorm/")),
)
TORCH_RULES = (
    ("optimizer update", ("_foreach", "Optimizer.step", "adamw", "clip_grad"), ()),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax", "bmm"), ()),
    ("convolution", ("convolution", "conv2d"), ()),
    ("matmul", ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear"), ()),
    ("norms", ("group_norm", "layer_norm", "batch_norm"), ()),
)


def classify(rules, op_type, scope=""):
    for name, types, scopes in rules:
        if any(t.lower() in op_type.lower() for t in types) or any(s in scope for s in scopes):
            return name
    return "elementwise"


def _mindspore_rows(profile_dir):
    """(op type, scope, seconds) of every op the profiler recorded under ``profile_dir``."""
    files = glob.glob(os.path.join(profile_dir, "**", "cpu_op_detail_info_*.csv"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no cpu_op_detail_info_*.csv under {profile_dir}")
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                yield row["op_type"], row["full_op_name"], float(row["op_total_time(ms)"]) / 1000.0


def _summary(rows, rules, top):
    """({class: seconds}, the ``top`` (class, op type, seconds) with the most time) of (type, scope, s) rows."""
    classes, types = dict.fromkeys(CLASSES, 0.0), {}
    for op_type, scope, seconds in rows:
        name = classify(rules, op_type, scope)
        classes[name] += seconds
        types[(name, op_type)] = types.get((name, op_type), 0.0) + seconds
    return classes, [(c, t, v) for (c, t), v in sorted(types.items(), key=lambda kv: -kv[1])[:top]]


def mindspore_op_seconds(profile_dir, top=12):
    """({class: seconds}, top op types) summed over every op recorded under ``profile_dir``."""
    return _summary(_mindspore_rows(profile_dir), MINDSPORE_RULES, top)


def torch_op_seconds(prof, top=12):
    """({class: seconds}, top op types) of self CPU time from a finished ``torch.profiler.profile``."""
    rows = [(e.key, "", e.self_cpu_time_total / 1e6) for e in prof.key_averages()
            if not (e.key.startswith("ProfilerStep") or e.key.startswith("## "))]
    return _summary(rows, TORCH_RULES, top)
