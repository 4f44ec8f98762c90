"""Mixed precision: torch's GradScaler arithmetic for fp16, the update skipped on inf/NaN gradients
inside the compiled update, and the bf16-on-CPU stop."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mindspore as ms  # noqa: E402
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops  # noqa: E402

from library.loss_scaler import DynamicLossScaler  # noqa: E402
from train_network import _build_step_cells  # noqa: E402


def test_scale_sequence_matches_torch_gradscaler():
    import torch

    pattern = [False, False, True, False, False, False, True, True, False, False, False, False]
    ours = DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    got, want = [], []
    for inf in pattern:
        opt.zero_grad()
        x = torch.tensor([float("inf") if inf else 1.0, 2.0])
        scaler.scale((p * x).sum()).backward()
        scaler.step(opt)
        scaler.update()
        want.append(scaler.get_scale())
        ours.update(found_inf=inf)
        got.append(ours.scale)
    assert got == want, (got, want)
    assert ours.skipped_steps == 3 and float(ours.parameter.asnumpy()) == want[-1]


class _Loss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.w = Parameter(Tensor(np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)), name="w")

    def construct(self, x):
        return ops.reduce_sum(ops.matmul(x, self.w) ** 2)


@pytest.mark.parametrize("poison", [False, True])
def test_update_skipped_on_non_finite_gradients(poison):
    from library.train_optimizers import AdamW

    _, _, AccumulateStep, ApplyAccumulated = _build_step_cells()
    net = _Loss()
    params = [net.w]
    opt = AdamW(params, [0], [0.1])
    scale = Parameter(Tensor(np.float32(4096.0)), name="loss_scale", requires_grad=False)
    buffers = ParameterTuple(params).clone(prefix="grad_accum", init="zeros")
    step = AccumulateStep(net, params, buffers, 2, None, loss_scale=scale)
    apply = ApplyAccumulated(buffers, opt, 1.0, None, skip_non_finite=True)
    x = np.array([[1.0, 2.0]], np.float32)
    w0 = net.w.asnumpy().copy()
    step(Tensor(x))
    # the buffers hold the unscaled gradient / accumulation steps: d/dw sum((xw)^2) = 2 x^T (xw)
    np.testing.assert_allclose(buffers[0].asnumpy(), 2 * x.T @ (x @ w0) / 2, rtol=1e-6)
    step(Tensor(np.array([[np.inf, 1.0]], np.float32) if poison else x))
    finite = bool(apply().asnumpy())
    assert finite is (not poison)
    assert np.all(buffers[0].asnumpy() == 0)  # zeroed either way
    if poison:
        np.testing.assert_array_equal(net.w.asnumpy(), w0)
        assert float(opt.step_count.asnumpy()) == 0
    else:
        assert not np.allclose(net.w.asnumpy(), w0) and float(opt.step_count.asnumpy()) == 1


def test_bf16_on_cpu_stops_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sdxl_train_network.py"),
                           "--pretrained_model_name_or_path", str(tmp_path / "m.safetensors"), "--output_dir",
                           str(tmp_path), "--network_module", "networks.lora", "--train_data_dir", str(tmp_path),
                           "--mixed_precision", "bf16", "--device_target", "CPU"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "bf16 is not supported on CPU" in lines[0], proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sdxl_train_network.py"),
                           "--pretrained_model_name_or_path", str(tmp_path / "m.safetensors"), "--output_dir",
                           str(tmp_path), "--network_module", "networks.lora", "--full_fp16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "full_fp16 requires mixed precision='fp16'" in proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sdxl_train_network.py"),
                           "--pretrained_model_name_or_path", str(tmp_path / "m.safetensors"), "--output_dir",
                           str(tmp_path), "--network_module", "networks.lora", "--fp16_unet_weights",
                           "--mixed_precision", "fp16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "--fp16_unet_weights is for --mixed_precision no" in proc.stderr
