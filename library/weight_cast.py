"""A frozen weight stored in another dtype than the activations, cast for one use (forward or backward)."""
from mindspore import ops


def cast_weight(weight, x, per_use=True):
    """``weight`` in x's dtype. The graph backend computes a cast of a parameter alone once, ahead of the
    layers, and keeps it for the whole graph (in a one-graph step, every fp16 weight's fp32 copy at once;
    Limitations.md has the measurement); ``per_use`` makes it
    depend on x, a cast per use. Graphs that hold a few layers (``short_graph_forms``) cast once."""
    if weight.dtype == x.dtype:
        return weight
    w = ops.depend(weight, x) if per_use else weight
    return w.astype(x.dtype)


def backward_cast(weight, dout, per_use):
    """``cast_weight`` in a bprop (per use: made in the backward, not kept from the forward)."""
    if per_use:
        return ops.depend(weight, dout).astype(dout.dtype)
    return weight.astype(dout.dtype)
