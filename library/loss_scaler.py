"""Dynamic loss scaling for ``--mixed_precision fp16`` (torch's ``GradScaler``, as accelerate sets it up
for kohya: initial scale 2**16, x2 after 2000 steps without overflow, x0.5 and the update skipped on
an overflow).

The compiled step multiplies the backward seed by ``scale`` and accumulates ``grads / scale`` in fp32
buffers; the update cell checks the (rank-averaged) gradients for inf/NaN and skips the optimizer
when there are any. This host-side object holds the scale (a Parameter read by the graph) and its
growth counter.
"""
from __future__ import annotations

import numpy as np

INIT_SCALE, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0 ** 16, 2.0, 0.5, 2000


class DynamicLossScaler:
    def __init__(self, init_scale=INIT_SCALE, growth_factor=GROWTH_FACTOR, backoff_factor=BACKOFF_FACTOR,
                 growth_interval=GROWTH_INTERVAL):
        import mindspore as ms
        from mindspore import Parameter, Tensor

        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.growth_tracker = 0
        self.skipped_steps = 0
        self.parameter = Parameter(Tensor(np.float32(self.scale), ms.float32), name="loss_scale", requires_grad=False)

    def update(self, found_inf: bool):
        """torch.amp.GradScaler.update after one optimizer step (skipped when ``found_inf``)."""
        from mindspore import Tensor

        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped_steps += 1
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0
        self.parameter.set_data(Tensor(np.float32(self.scale)))

    def state(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "skipped_steps": self.skipped_steps}

    def load_state(self, state: dict):
        from mindspore import Tensor

        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.skipped_steps = int(state["skipped_steps"])
        self.parameter.set_data(Tensor(np.float32(self.scale)))
