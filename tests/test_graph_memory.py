"""Graph-mode memory regression: the CPU backend does not reuse the memory of
binary ops that broadcast implicitly, so ``layers.GroupNorm`` and
``layers.Linear`` broadcast explicitly (BiasAdd, ``ops.broadcast_to``).
Measured: GroupNorm stack forward+backward 0.98 GB (2.77 GB with implicit
broadcasts), Linear stack forward 0.50 GB (2.99 GB with dense's bias add),
GELU stack forward 0.48 GB (2.98 GB with nn.GELU / ops.gelu exact).
The hand-written backward passes keep training memory down too: six 20-head
1024-token attentions (``attention.SoftmaxAttend``) forward+backward 0.86 GB
(3.02 GB with the primitives' backward), frozen 320-channel 3x3
convolutions at 64x64 (``layers.Conv2dStride1``) 24 MB per layer (61 MB), and
fp16-stored frozen weights computed in fp32 (``layers.StoredDense``) half the fp32 peak."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, %r)
    import library
    import numpy as np, mindspore as ms
    from mindspore import nn, ops, Tensor
    from library import layers
    from library.attention import SoftmaxAttend
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    kind = sys.argv[1]
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 0

    class Stack(nn.Cell):
        def __init__(self):
            super().__init__()
            if kind == "groupnorm":
                self.blocks = nn.CellList([layers.GroupNorm(32, 64) for _ in range(20)])
            elif kind == "attention":
                self.blocks = nn.CellList([SoftmaxAttend() for _ in range(6)])
            elif kind == "conv3x3":
                self.blocks = nn.CellList([layers.Conv2d(320, 320, 3, padding=1) for _ in range(depth)])
                for p in self.get_parameters():
                    p.requires_grad = False  # frozen, as the U-Net under LoRA
            elif kind in ("frozen_fp32", "frozen_fp16"):  # 24 frozen 4096x4096 Linear: 1.5 GB in fp32
                blocks = []
                for _ in range(24):
                    blk = layers.Linear(4096, 4096, bias=False)
                    blk.weight.requires_grad = False
                    if kind == "frozen_fp16":
                        blk.weight.set_dtype(ms.float16)  # one layer at a time: no 1.5 GB of fp32 first
                    blocks.append(blk)
                self.blocks = nn.CellList(blocks)
            elif kind == "gelu":
                self.blocks = nn.CellList([layers.GELU() for _ in range(40)])
            else:
                self.blocks = nn.CellList([layers.Linear(64, 64) for _ in range(40)])
        def construct(self, x):
            for blk in self.blocks:
                x = blk(x, x, x) + x if kind == "attention" else ops.silu(blk(x))
            return x

    net = Stack()
    rng = np.random.default_rng(0)
    if kind == "groupnorm":  # forward + backward, 1x64x128x128 (4 MiB per activation)
        x = Tensor(rng.standard_normal((1, 64, 128, 128)).astype(np.float32))
        grad = ms.jit(ms.grad(net, grad_position=0, weights=net.trainable_params()))
        grad(x)[0].asnumpy()
    elif kind in ("attention", "conv3x3", "frozen_fp32", "frozen_fp16"):  # forward + backward w.r.t. the input
        shape = {"attention": (1, 20, 1024, 64), "conv3x3": (1, 320, 64, 64)}.get(kind, (1, 16, 4096))
        x = Tensor(0.1 * rng.standard_normal(shape).astype(np.float32))
        ms.jit(ms.grad(net, grad_position=0))(x).asnumpy()
    else:  # linear / gelu: forward, 65536 tokens x 64 (16 MiB per activation)
        x = Tensor(rng.standard_normal((1, 65536, 64)).astype(np.float32))
        net(x).asnumpy()
    # VmHWM, not ru_maxrss: a child starts with its parent's ru_maxrss (a large pytest worker's)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("PEAK_GB", int(hwm) / 1024 ** 2)
""") % ROOT


@pytest.mark.parametrize("kind,bound_gb", [("groupnorm", 1.6), ("linear", 1.2), ("gelu", 1.2), ("attention", 1.5)])
def test_stack_memory_graph_mode(tmp_path, kind, bound_gb):
    peak = _peak_gb(tmp_path, kind)
    assert peak < bound_gb, f"{kind} stack peaked at {peak:.2f} GB in graph mode"


def _peak_gb(tmp_path, kind, depth=0):
    script = tmp_path / "stack.py"  # graph mode compiles from source files only
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), kind, str(depth)], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    return float([l for l in r.stdout.splitlines() if l.startswith("PEAK_GB")][-1].split()[1])


def test_frozen_conv3x3_memory_per_layer(tmp_path):
    """Growth from 4 to 12 layers, so the fixed part of the process does not count."""
    per_layer = (_peak_gb(tmp_path, "conv3x3", 12) - _peak_gb(tmp_path, "conv3x3", 4)) / 8
    assert per_layer < 0.04, f"each frozen 3x3 conv layer keeps {per_layer * 1024:.0f} MB in graph mode"


def test_fp16_stored_frozen_weights_halve_memory(tmp_path):
    """fp16-stored frozen Linear weights computed in fp32 (``--fp16_unet_weights``) cost half the fp32
    weights in a forward+backward: the fp32 casts are not kept for the backward (they would make it
    1.5x the fp32 weights instead)."""
    fp32, fp16 = _peak_gb(tmp_path, "frozen_fp32"), _peak_gb(tmp_path, "frozen_fp16")
    assert fp16 < fp32 - 0.5, f"24 frozen 4096x4096 layers: fp16-stored {fp16:.2f} GB, fp32 {fp32:.2f} GB"
