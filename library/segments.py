"""A model run as a chain of separately compiled segments, with gradient checkpointing done by the
program instead of by the backend.

A ``Segment`` is a cell whose inputs and outputs are named tensors. ``SegmentChain.forward`` runs
each segment's compiled forward in order and keeps only the named tensors (the segment
boundaries). ``SegmentChain.backward`` walks the segments in reverse: one compiled graph per
segment recomputes its forward and returns the gradients of its inputs and of its trainable
parameters, given the gradients of its outputs. So the peak memory is the boundaries plus one
segment's forward+backward, whatever the backend does with the buffers inside a graph (the CPU
graph backend keeps every kernel's output until its graph ends).

In PyNative mode the same chain runs eagerly: the forward builds no autodiff tape, and each
segment's backward is its own ``GradOperation``.

Random ops inside a segment draw differently in the forward and in the recomputation (torch's
checkpoint restores the RNG state instead), so a chain is only built for deterministic segments:
the trainer keeps the one-graph step when LoRA dropouts are on.
"""
import collections
import copy
import time
from typing import Dict, List, Sequence

# attributes that name a cell without changing what it computes
_NAME_ATTRIBUTES = ("lora_name",)


class Segment:
    """``cell(*values[inputs]) -> values[outputs]`` (one tensor, or a tuple for several names).

    ``param_cells``: the cells whose parameters the segment computes with, when ``cell`` holds more
    than it uses (default: ``cell`` itself)."""

    def __init__(self, name: str, cell, inputs: Sequence[str], outputs: Sequence[str], param_cells=None):
        self.name = name
        self.cell = cell
        self.param_cells = [cell] if param_cells is None else list(param_cells)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.params = []  # trainable parameters inside the cell (set by SegmentChain)
        self.template = None  # a SharedGraph running this segment's computation (set by SegmentChain)
        self.kind = type(cell).__name__.strip("_")  # for the time breakdown
        self._backward = None

    def run_forward(self, args):
        if self.template is None:
            return self.cell(*args)
        self.template.bind(self)
        return self.template.cell(*args)

    def run_backward(self, args):
        """(input grads, grads of ``self.params`` in order)."""
        if self.template is None:
            return _run_backward(self, self.cell, self.params, args)
        self.template.bind(self)
        return _run_backward(self.template, self.template.cell, self.template.trainable, args)


def _run_backward(owner, cell, params, args):
    """``owner``'s backward graph of ``cell`` (built on first use) on ``args``: (input grads, param grads)."""
    if owner._backward is None:
        owner._backward = _backward_cell_class()(cell, params)
    result = owner._backward(*args)
    return result if params else (result, ())


def structure_key(cell):
    """What a compiled graph of ``cell`` depends on besides its parameters' values: the cell tree's
    classes and constant attributes, and each parameter's name, shape, dtype and trainability. Two
    cells with the same key compute the same function of their inputs and parameters."""
    parts = []
    for name, sub in cell.cells_and_names():
        attrs = tuple(sorted((k, v) for k, v in vars(sub).items()
                             if not k.startswith("_") and k not in _NAME_ATTRIBUTES
                             and isinstance(v, (bool, int, float, str, type(None), tuple))))
        parts.append((name, type(sub).__qualname__, attrs))
    for p in cell.get_parameters():
        parts.append((p.name.split(".")[-1], tuple(p.shape), str(p.dtype), bool(p.requires_grad)))
    return tuple(parts)


class SharedGraph:
    """One compiled forward and backward for ``segments`` with the same ``structure_key`` and the same
    trainable parameter positions: a copy of the first segment's cell whose parameters are pointed at
    the running segment's parameters (``Parameter.set_data`` shares the storage: nothing is copied)
    before each call."""

    def __init__(self, segments: List["Segment"], positions, index: int):
        self.cell = copy.deepcopy(segments[0].cell)
        self.cell_params = list(self.cell.get_parameters())
        for p in self.cell_params:  # graph parameter names stay unique
            p.name = f"shared{index}.{p.name}"
        self.trainable = [self.cell_params[i] for i in positions]
        self._backward = None
        for seg in segments:
            seg._own_params = list(seg.cell.get_parameters())
            seg.params = [seg._own_params[i] for i in positions]  # in the shared graph's order
            seg.template = self
        self.bind(segments[0])  # frees the copy's own values

    def bind(self, seg):
        # every call: a parameter whose data was replaced (set_data: loading weights, resume) is seen
        for t, p in zip(self.cell_params, seg._own_params):
            t.set_data(p)


def _backward_cell_class():
    from mindspore import ParameterTuple, nn, ops

    class SegmentBackward(nn.Cell):
        """(input grads, parameter grads) of ``fn`` given its inputs and the output gradient (sens):
        the segment's forward is recomputed inside this graph."""

        def __init__(self, fn, params):
            super().__init__(auto_prefix=False)
            self.fn = fn
            self.with_params = len(params) > 0
            self.weights = ParameterTuple(params)
            self.grad = ops.GradOperation(get_all=True, get_by_list=self.with_params, sens_param=True)

        def construct(self, *args):
            if self.with_params:
                return self.grad(self.fn, self.weights)(*args)
            return self.grad(self.fn)(*args)

    return SegmentBackward


class SegmentChain:
    """Segments in execution order over named tensors.

    ``data`` names the tensors fed from outside (no gradient); ``params`` are the trainable
    parameters whose gradients ``backward`` returns, in that order (zeros for one no segment reaches).
    """

    def __init__(self, segments: List[Segment], data: Sequence[str], params):
        self.segments = list(segments)
        self.data = tuple(data)
        self.params = list(params)
        by_id = {id(p): p for p in self.params}
        produced = set(self.data)
        for seg in self.segments:
            missing = [n for n in seg.inputs if n not in produced]
            if missing:
                raise ValueError(f"segment {seg.name}: inputs {missing} are produced by no earlier segment")
            produced.update(seg.outputs)
            seg.params = list({id(p): p for c in seg.param_cells for p in c.get_parameters() if id(p) in by_id}.values())
        owned = [id(p) for seg in self.segments for p in seg.params]
        if len(owned) != len(set(owned)):
            raise ValueError("a trainable parameter belongs to more than one segment")
        groups = {}
        for seg in self.segments:
            if seg.param_cells == [seg.cell]:
                trainable = {id(p) for p in seg.params}
                positions = tuple(i for i, p in enumerate(seg.cell.get_parameters()) if id(p) in trainable)
                groups.setdefault((type(seg.cell), structure_key(seg.cell), positions), []).append(seg)
        self.shared = [SharedGraph(segs, positions, index) for index, ((_, _, positions), segs)
                       in enumerate((k, v) for k, v in groups.items() if len(v) > 1)]
        # a tensor needs a gradient when a trainable parameter is upstream of it
        self.needs_grad = set()
        for seg in self.segments:
            if seg.params or any(n in self.needs_grad for n in seg.inputs):
                self.needs_grad.update(seg.outputs)
        self.seconds = collections.defaultdict(float)  # (phase, segment kind) -> time in its graph calls
        self.first_use, self.last_use = {}, {}
        for i, seg in enumerate(self.segments):
            for n in seg.inputs:
                self.first_use.setdefault(n, i)
                self.last_use[n] = i

    def set_train(self, mode=True):
        for cell in [seg.cell for seg in self.segments] + [shared.cell for shared in self.shared]:
            cell.set_train(mode)

    @property
    def num_graphs(self):
        """Distinct compiled forward graphs (each with at most one backward)."""
        return len([s for s in self.segments if s.template is None]) + len(self.shared)

    def forward(self, values: Dict[str, object], keep=True) -> Dict[str, object]:
        """Runs every segment; ``values`` (the data tensors) gains every boundary tensor. ``keep=False``
        (inference): each tensor is dropped after its last reader, only the outputs no segment reads stay."""
        for i, seg in enumerate(self.segments):
            t0 = time.perf_counter()
            out = seg.run_forward([values[n] for n in seg.inputs])
            self.seconds[("forward", seg.kind)] += time.perf_counter() - t0
            if len(seg.outputs) == 1:
                out = (out,)
            values.update(zip(seg.outputs, out))
            if not keep:
                for n in seg.inputs:
                    if self.last_use[n] == i:
                        values.pop(n, None)
        return values

    def backward(self, values: Dict[str, object], sens: Dict[str, object]):
        """Gradients of ``self.params`` given ``sens`` (output name -> its gradient, e.g. the loss scale).

        ``values`` is what ``forward`` returned; it is emptied as the boundaries stop being needed."""
        import mindspore as ms
        from mindspore import ops

        grads = dict(sens)
        param_grads = {}
        for i in range(len(self.segments) - 1, -1, -1):
            seg = self.segments[i]
            if not (seg.params or any(n in self.needs_grad for n in seg.inputs)):
                continue
            if not any(n in grads for n in seg.outputs):
                continue  # nothing downstream of it reaches the loss
            douts = [grads.pop(n) if n in grads else ops.zeros_like(values[n]) for n in seg.outputs]
            # mutable: a tuple argument of a graph is otherwise a constant, recompiled for every new value
            sens_arg = douts[0] if len(douts) == 1 else ms.mutable(tuple(douts))
            t0 = time.perf_counter()
            input_grads, p_grads = seg.run_backward([values[n] for n in seg.inputs] + [sens_arg])
            self.seconds[("recompute+backward", seg.kind)] += time.perf_counter() - t0
            for p, g in zip(seg.params, p_grads):
                param_grads[id(p)] = g
            for n, g in zip(seg.inputs, input_grads):
                if n in self.needs_grad:
                    grads[n] = g if n not in grads else grads[n] + g
            for n in seg.inputs:  # boundaries nothing earlier reads
                if self.first_use.get(n) == i and n not in self.data:
                    values.pop(n, None)
        return tuple(param_grads[id(p)] if id(p) in param_grads else ops.zeros_like(p) for p in self.params)
