"""The compiled training step cells: forward+backward+clip+update in one graph (``TrainStep``), or
gradient accumulation (``AccumulateStep``) with a separate update (``ApplyAccumulated``); fp16 loss
scaling and data-parallel gradient means plug into them.

``SegmentedStep`` is the same step with the forward and backward run as a chain of compiled segments
(``library.segments``: gradient checkpointing by the program); the gradients then go to
``ApplyGrads`` (reduce, clip, update) or ``AccumulateGrads`` (into the buffers ``ApplyAccumulated``
reads), the same maths as ``TrainStep`` / ``AccumulateStep`` after their backward."""
import functools
import time


# ---------------------------------------------------------------------------------------------
# the compiled step

def _build_step_cells():
    """(LossAndGrads, TrainStep, AccumulateStep, ApplyAccumulated)."""
    c = _step_cells()
    return c["LossAndGrads"], c["TrainStep"], c["AccumulateStep"], c["ApplyAccumulated"]


@functools.lru_cache(maxsize=None)
def _grad_fns():
    """The per-tensor graph functions the step cells map over gradient tuples (defined lazily, as the cells)."""
    import mindspore as ms
    from mindspore import ops

    square_sum = ops.MultitypeFuncGraph("square_sum")

    @square_sum.register("Tensor")
    def _square_sum(g):
        return ops.reduce_sum(ops.square(g.astype(ms.float32)))

    scale_grad = ops.MultitypeFuncGraph("scale_grad")

    @scale_grad.register("Tensor", "Tensor")
    def _scale_grad(coef, g):
        return g * coef.astype(g.dtype)

    accumulate = ops.MultitypeFuncGraph("accumulate")

    @accumulate.register("Tensor", "Tensor", "Tensor")
    def _accumulate(scale, buf, g):
        return ops.assign_add(buf, g * scale)

    zero = ops.MultitypeFuncGraph("zero")

    @zero.register("Tensor")
    def _zero(buf):
        return ops.assign(buf, ops.zeros_like(buf))

    copy = ops.MultitypeFuncGraph("copy")

    @copy.register("Tensor")
    def _copy(buf):
        return buf * 1.0

    hyper_map = ops.HyperMap()

    def clip_grads(grads, max_norm):
        """torch's clip_grad_norm_: coef = max_norm / (total_norm + 1e-6), clamped to 1."""
        total = ops.sqrt(ops.addn(hyper_map(square_sum, grads)))
        coef = ops.minimum(max_norm / (total + 1e-6), ops.ones((), ms.float32))
        return hyper_map(ops.partial(scale_grad, coef), grads)

    return square_sum, accumulate, zero, copy, hyper_map, clip_grads


@functools.lru_cache(maxsize=None)
def _step_cells():
    """Cells are defined lazily so that importing this module does not import mindspore."""
    import mindspore as ms
    from mindspore import ParameterTuple, nn, ops

    square_sum, accumulate, zero, copy, hyper_map, clip_grads = _grad_fns()

    class LossAndGrads(nn.Cell):
        """(loss, grads of the loss w.r.t. ``params``) of ``loss_net(*inputs)``."""

        def __init__(self, loss_net, params, loss_scale=None):
            super().__init__(auto_prefix=False)
            self.loss_net = loss_net
            self.weights = ParameterTuple(params)
            self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
            self.scaled = loss_scale is not None  # fp16: the backward starts from loss_scale (GradScaler)
            self.loss_scale = loss_scale

        def construct(self, *inputs):
            loss = self.loss_net(*inputs)
            sens = ops.ones_like(loss)
            if self.scaled:
                sens = sens * self.loss_scale.astype(loss.dtype)
            grads = self.grad(self.loss_net, self.weights)(*inputs, sens)
            return loss, grads

    class ApplyGrads(nn.Cell):
        """``TrainStep`` after its backward: data-parallel mean, clip, optimizer update; returns the loss."""

        def __init__(self, optimizer, max_grad_norm, reducer=None):
            super().__init__(auto_prefix=False)
            self.optimizer = optimizer
            self.max_grad_norm = float(max_grad_norm or 0.0)
            self.reduce = reducer is not None  # data parallel: mean over ranks (library/distributed.py)
            self.reducer = reducer

        def construct(self, loss, grads):
            if self.reduce:
                grads = self.reducer.grads(grads)
                loss = self.reducer.loss(loss)
            if self.max_grad_norm > 0:
                grads = clip_grads(grads, self.max_grad_norm)
            return ops.depend(loss, self.optimizer(grads))

    class AccumulateGrads(nn.Cell):
        """``AccumulateStep`` after its backward: grads / accumulation_steps (unscaled) into the buffers."""

        def __init__(self, accum_buffers, accumulation_steps, reducer=None, loss_scale=None):
            super().__init__(auto_prefix=False)
            self.accum = accum_buffers
            self.scale = ms.Tensor(1.0 / accumulation_steps, ms.float32)
            self.scaled = loss_scale is not None  # unscaled as they are accumulated (fp32 buffers)
            self.loss_scale = loss_scale
            self.reduce = reducer is not None  # the loss only: gradients are averaged once per update
            self.reducer = reducer

        def construct(self, loss, grads):
            if self.reduce:
                loss = self.reducer.loss(loss)
            scale = self.scale
            if self.scaled:
                scale = scale / self.loss_scale
            done = hyper_map(ops.partial(accumulate, scale), self.accum, grads)
            return ops.depend(loss, done)

    class TrainStep(nn.Cell):
        """forward + backward + clip + optimizer update in one graph; returns the loss."""

        def __init__(self, loss_net, params, optimizer, max_grad_norm, reducer=None):
            super().__init__(auto_prefix=False)
            self.loss_and_grads = LossAndGrads(loss_net, params)
            self.update = ApplyGrads(optimizer, max_grad_norm, reducer)

        def construct(self, *inputs):
            loss, grads = self.loss_and_grads(*inputs)
            return self.update(loss, grads)

    class AccumulateStep(nn.Cell):
        """forward + backward; adds grads / accumulation_steps to buffers (accelerate's loss scaling)."""

        def __init__(self, loss_net, params, accum_buffers, accumulation_steps, reducer=None, loss_scale=None):
            super().__init__(auto_prefix=False)
            self.loss_and_grads = LossAndGrads(loss_net, params, loss_scale)
            self.accumulate = AccumulateGrads(accum_buffers, accumulation_steps, reducer, loss_scale)

        def construct(self, *inputs):
            loss, grads = self.loss_and_grads(*inputs)
            return self.accumulate(loss, grads)

    class ApplyAccumulated(nn.Cell):
        """clip + optimizer update from the buffers, then zero them."""

        def __init__(self, accum_buffers, optimizer, max_grad_norm, reducer=None, skip_non_finite=False):
            super().__init__(auto_prefix=False)
            self.accum = accum_buffers
            self.optimizer = optimizer
            self.max_grad_norm = float(max_grad_norm or 0.0)
            self.skip_non_finite = skip_non_finite  # fp16 loss scaling: no update on inf/NaN gradients
            self.reduce = reducer is not None  # data parallel: mean of the accumulated gradients over ranks
            self.reducer = reducer

        def construct(self):
            grads = hyper_map(copy, self.accum)
            if self.reduce:
                grads = self.reducer.grads(grads)
            finite = ops.ones((), ms.bool_)
            if self.skip_non_finite:
                finite = ops.isfinite(ops.addn(hyper_map(square_sum, grads)))
            if finite:
                if self.max_grad_norm > 0:
                    grads = clip_grads(grads, self.max_grad_norm)
                grads = ops.depend(grads, self.optimizer(grads))
            return ops.depend(finite, hyper_map(zero, self.accum))

    return dict(LossAndGrads=LossAndGrads, TrainStep=TrainStep, AccumulateStep=AccumulateStep,
                ApplyAccumulated=ApplyAccumulated, ApplyGrads=ApplyGrads, AccumulateGrads=AccumulateGrads)


class SegmentedStep:
    """Called as ``TrainStep`` / ``AccumulateStep`` are (``step(*inputs) -> loss``): forward and backward
    over ``chain`` (a ``SegmentChain`` whose data names are the inputs, in order, and whose last output
    is the loss), then ``apply_cell(loss, grads)`` (``ApplyGrads`` or ``AccumulateGrads``).
    ``loss_scale`` (fp16): the backward starts from it, as ``LossAndGrads`` does."""

    def __init__(self, chain, apply_cell, loss_name="loss", loss_scale=None):
        self.chain = chain
        self.apply_cell = apply_cell
        self.loss_name = loss_name
        self.loss_scale = loss_scale
        self.calls = 0
        self.seconds = {}

    def time_breakdown(self):
        """Mean seconds per step after the first (compiling) one: forward and recompute+backward per segment
        kind, the update, and the rest (Python between the graph calls); {} before the second step."""
        n = self.calls - 1
        if n < 1:
            return {}
        out = {f"{phase} {kind}": v / n for (phase, kind), v in sorted(self.chain.seconds.items())}
        out["update"] = self.seconds["update"] / n
        out["between graphs"] = (self.seconds["total"] - sum(self.chain.seconds.values())
                                 - self.seconds["update"]) / n
        return out

    def set_train(self, mode=True):
        self.chain.set_train(mode)
        self.apply_cell.set_train(mode)

    def loss_and_grads(self, *inputs):
        from mindspore import ops

        values = self.chain.forward(dict(zip(self.chain.data, inputs)))
        loss = values[self.loss_name]
        sens = ops.ones_like(loss)
        if self.loss_scale is not None:
            sens = sens * self.loss_scale.astype(loss.dtype)
        return loss, self.chain.backward(values, {self.loss_name: sens})

    def __call__(self, *inputs):
        import mindspore as ms

        if self.calls == 1:  # the first call compiled: measure from the second on
            self.chain.seconds.clear()
            self.seconds = {}
        self.calls += 1
        t0 = time.perf_counter()
        loss, grads = self.loss_and_grads(*inputs)
        t1 = time.perf_counter()
        loss = self.apply_cell(loss, ms.mutable(grads))  # mutable: not a constant of the graph (recompiled)
        t2 = time.perf_counter()
        self.seconds["update"] = self.seconds.get("update", 0.0) + t2 - t1
        self.seconds["total"] = self.seconds.get("total", 0.0) + t2 - t0
        return loss


class SegmentedLoss:
    """The loss cell's forward run as ``chain``'s forward (validation with the segmented step): called
    as the loss cell is, each boundary dropped after its last reader."""

    def __init__(self, chain, loss_name="loss"):
        self.chain = chain
        self.loss_name = loss_name

    def set_train(self, mode=True):
        self.chain.set_train(mode)

    def __call__(self, *inputs):
        return self.chain.forward(dict(zip(self.chain.data, inputs)), keep=False)[self.loss_name]


class ParameterwiseUpdate:
    """``ApplyGrads`` (clip, optimizer update) for the segmented step, a chunk of same-shape parameters
    per graph call.

    One graph over every LoRA tensor costs per kernel, not per byte (SDXL's 1444 LoRA tensors under
    AdamW: a minute of compile and gigabytes kept for its intermediates), and one graph call per tensor
    costs per call (the call's fixed overhead is many times a small tensor's update). So parameters
    are grouped by the shapes and dtypes of the parameter and its optimizer states, and each group runs
    in chunks of up to ``max_chunk``: the optimizer's own per-parameter function (``update_fn``, see
    ``library.train_optimizers``) over one chunk in one small graph, whose parameter and state
    Parameters are pointed at the chunk's real ones (``Parameter.set_data`` shares the storage) before
    its call. A group compiles at most two graphs (full chunk, remainder). The step's shared scalars
    come from one small prologue graph; the total gradient norm for ``max_grad_norm`` is summed on the
    host. Only single-process steps without accumulation or loss scaling use it (``supports``).

    Two-phase optimizers (``accumulate_fn``: Prodigy, D-Adaptation) first run ``accumulate_fn`` over the
    same chunks, each chunk graph returning the sum of its parameters' contributions; one more graph
    adds them up and runs the optimizer's ``finish`` (the values every ``update_fn`` call then takes)."""

    def __init__(self, optimizer, max_grad_norm, max_chunk=8):
        import numpy as np
        import mindspore as ms

        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.prologue = _update_cells()["Prologue"](optimizer)
        states = optimizer.per_param_states()
        groups = {}
        for i, p in enumerate(optimizer.params):
            own = [p] + [s[i] for s in states]
            groups.setdefault(tuple((tuple(t.shape), str(t.dtype)) for t in own), []).append((i, own))
        accumulate_fn = getattr(optimizer, "accumulate_fn", None)
        templates, accumulators, self.items, self.accumulate_items = {}, {}, [], []
        for key, members in groups.items():
            for start in range(0, len(members), max_chunk):
                chunk = members[start:start + max_chunk]
                if (key, len(chunk)) not in templates:
                    templates[(key, len(chunk))] = _update_cells()["UpdateChunk"](
                        optimizer.update_fn, chunk[0][1], len(chunk), len(templates))
                    if accumulate_fn is not None:
                        accumulators[(key, len(chunk))] = _update_cells()["UpdateChunk"](
                            accumulate_fn, chunk[0][1], len(chunk), f"a{len(accumulators)}", reduce=True)
                indices = [i for i, _ in chunk]
                group_of = ms.Tensor(np.asarray([optimizer.group_of[i] for i in indices], np.int32))
                self.items.append((templates[(key, len(chunk))], [own for _, own in chunk], indices, group_of))
                if accumulate_fn is not None:
                    self.accumulate_items.append((accumulators[(key, len(chunk))],) + self.items[-1][1:])
        self.templates = list(templates.values())
        self.finish = _update_cells()["Finish"](optimizer) if accumulate_fn is not None else None

    @staticmethod
    def supports(optimizer, reducer, accumulation_steps, loss_scale):
        return (reducer is None and accumulation_steps == 1 and loss_scale is None
                and getattr(optimizer, "update_fn", None) is not None)

    def set_train(self, mode=True):
        pass

    def __call__(self, loss, grads):
        import numpy as np
        import mindspore as ms

        coef = 1.0
        if self.max_grad_norm > 0:  # torch's clip_grad_norm_
            total = np.sqrt(sum(float(np.square(g.asnumpy(), dtype=np.float64).sum()) for g in grads))
            coef = min(self.max_grad_norm / (total + 1e-6), 1.0)
        coef = ms.Tensor(np.float32(coef))
        scalars = tuple(self.prologue())  # passed one by one: no tuple to index in the graphs
        if self.finish is not None:  # two phases: the sums over all parameters, then the update with them
            parts = []
            for template, owns, indices, group_of in self.accumulate_items:
                template.bind(owns)
                template.num_scalars = template.num_scalars or len(scalars)
                parts.append(template(group_of, coef, *scalars, *[grads[i] for i in indices]))
            scalars = tuple(self.finish(*parts))
        for template, owns, indices, group_of in self.items:
            template.bind(owns)
            template.num_scalars = template.num_scalars or len(scalars)  # a constant of its graph: set once
            template(group_of, coef, *scalars, *[grads[i] for i in indices])
        return loss


@functools.lru_cache(maxsize=None)
def _update_cells():
    import numpy as np
    import mindspore as ms
    from mindspore import Parameter, ParameterTuple, nn, ops

    class Prologue(nn.Cell):
        """One optimizer step's start: the step count advanced, the shared scalars and the group lrs."""

        def __init__(self, optimizer):
            super().__init__(auto_prefix=False)
            self.optimizer = optimizer

        def construct(self):
            step = self.optimizer._next_step()
            return self.optimizer.step_scalars(step) + (self.optimizer.lrs * 1.0,)

    class Finish(nn.Cell):
        """A two-phase step's middle: the chunks' contributions summed, the optimizer's ``finish``, the lrs."""

        def __init__(self, optimizer):
            super().__init__(auto_prefix=False)
            self.optimizer = optimizer

        def construct(self, *parts):
            return self.optimizer.finish(ops.addn(parts)) + (self.optimizer.lrs * 1.0,)

    class UpdateChunk(nn.Cell):
        """``update_fn`` for ``count`` parameters of one shape (their parameters and states bound by ``bind``).

        The states' slots are attributes ``state0``.. (graph mode unpacks no tuple of ParameterTuples).
        ``reduce``: return the sum of the results (a two-phase optimizer's contributions) instead."""

        max_states = 6  # CAME: exp_avg, two second-moment and two confidence factors, ams_bound's maximum

        def __init__(self, update_fn, like, count, index, reduce=False):
            super().__init__(auto_prefix=False)
            if len(like) - 1 > self.max_states:
                raise ValueError(f"an optimizer with {len(like) - 1} states per parameter (at most {self.max_states})")
            self.update_fn = update_fn
            self.count = count
            self.num_states = len(like) - 1
            self.num_scalars = 0  # set before the first call
            self.reduce = reduce
            self.slots = []
            for j, t in enumerate(like):  # the parameter, then each state
                slot = ParameterTuple([Parameter(ms.Tensor(np.zeros(t.shape, ms.dtype_to_nptype(t.dtype))),
                                                 name=f"update{index}.slot{j}.{k}", requires_grad=False)
                                       for k in range(count)])
                setattr(self, "param" if j == 0 else f"state{j - 1}", slot)
                self.slots.append(slot)

        def bind(self, owns):
            for k, own in enumerate(owns):
                for slot, p in zip(self.slots, own):
                    slot[k].set_data(p)

        def construct(self, group_of, coef, *args):
            """``args``: the prologue's scalars (``num_scalars``, the group lrs last), then the chunk's grads."""
            scalars, grads = args[:self.num_scalars], args[self.num_scalars:]
            lrs = ops.gather(scalars[-1], group_of, 0)
            out = ()
            for k in range(self.count):  # unrolled when compiled
                g = grads[k] * coef.astype(grads[k].dtype)
                if self.num_states == 0:
                    r = self.update_fn(*scalars[:-1], lrs[k], self.param[k], g)
                elif self.num_states == 1:
                    r = self.update_fn(*scalars[:-1], lrs[k], self.param[k], self.state0[k], g)
                elif self.num_states == 2:
                    r = self.update_fn(*scalars[:-1], lrs[k], self.param[k], self.state0[k], self.state1[k], g)
                elif self.num_states == 3:
                    r = self.update_fn(*scalars[:-1], lrs[k], self.param[k], self.state0[k], self.state1[k],
                                       self.state2[k], g)
                elif self.num_states == 4:
                    r = self.update_fn(*scalars[:-1], lrs[k], self.param[k], self.state0[k], self.state1[k],
                                       self.state2[k], self.state3[k], g)
                elif self.num_states == 5:
                    r = self.update_fn(*scalars[:-1], lrs[k], self.param[k], self.state0[k], self.state1[k],
                                       self.state2[k], self.state3[k], self.state4[k], g)
                else:
                    r = self.update_fn(*scalars[:-1], lrs[k], self.param[k], self.state0[k], self.state1[k],
                                       self.state2[k], self.state3[k], self.state4[k], self.state5[k], g)
                out = out + (r,)
            if self.reduce:
                return ops.addn(out)
            return out

    return dict(Prologue=Prologue, Finish=Finish, UpdateChunk=UpdateChunk)
