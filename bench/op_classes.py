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


def mindspore_op_seconds(profile_dir):
    """{class: seconds} summed over every op the profiler recorded under ``profile_dir``."""
    files = glob.glob(os.path.join(profile_dir, "**", "cpu_op_detail_info_*.csv"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no cpu_op_detail_info_*.csv under {profile_dir}")
    out = dict.fromkeys(CLASSES, 0.0)
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                out[classify(MINDSPORE_RULES, row["op_type"], row["full_op_name"])] += \
                    float(row["op_total_time(ms)"]) / 1000.0
    return out


def torch_op_seconds(prof):
    """{class: seconds} of self CPU time from a finished ``torch.profiler.profile``."""
    out = dict.fromkeys(CLASSES, 0.0)
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep") or event.key.startswith("## "):
            continue
        out[classify(TORCH_RULES, event.key)] += event.self_cpu_time_total / 1e6
    return out
