"""Single layers at SDXL's 1024x1024 inference shapes: MindSpore graph mode (this project's layers) vs
torch, same input shapes, fp32, forward only.

    python bench/bench_ops.py                    # every case
    python bench/bench_ops.py --cases gelu softmax

Each side runs in its own process; each case is timed as the best of ``--iters`` calls after a first
(compiling) one. A case returns only the first few values of its output (as an in-graph layer's output
never leaves the device; a reduction over it would be timed too, and MindSpore's CPU ``ReduceSum`` is
slow: the ``sum`` row times one alone on the largest input). The U-Net's batch is 2 (both guidance
branches), the VAE decoder's 1. Where the ratio is high is where a step's or a decode's time goes beyond
torch's.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

# name -> (kind, input shape, parameter): channels out, heads, or groups
CASES = {
    "conv3x3 320 @128 (U-Net)": ("conv", (2, 320, 128, 128), 320),
    "conv3x3 1280 @32 (U-Net)": ("conv", (2, 1280, 32, 32), 1280),
    "conv3x3 128 @1024 (VAE)": ("conv", (1, 128, 1024, 1024), 128),
    "conv3x3 512 @256 (VAE)": ("conv", (1, 512, 256, 256), 512),
    "groupnorm 320 @128 (U-Net)": ("groupnorm", (2, 320, 128, 128), 32),
    "groupnorm 128 @1024 (VAE)": ("groupnorm", (1, 128, 1024, 1024), 32),
    "silu 128 @1024 (VAE)": ("silu", (1, 128, 1024, 1024), 0),
    "upsample x2 512 @256 (VAE)": ("upsample", (1, 512, 256, 256), 0),
    "linear 640->5120, 4096 tokens": ("linear", (2, 4096, 640), 5120),
    "linear 1280->10240, 1024 tokens": ("linear", (2, 1024, 1280), 10240),
    "layernorm 640, 4096 tokens": ("layernorm", (2, 4096, 640), 0),
    "gelu (exact), 1024x5120": ("gelu", (2, 1024, 5120), 0),
    "attention 4096 tokens, 10 heads": ("attention", (2, 4096, 640), 10),
    "attention 1024 tokens, 20 heads": ("attention", (2, 1024, 1280), 20),
    "softmax 20x1024x1024": ("softmax", (2, 20, 1024, 1024), 0),
    "sum 128 @1024": ("sum", (1, 128, 1024, 1024), 0),
}
HEAD = 8  # output values a case hands back


def _time(fn, iters):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return first, best


def worker_mindspore(names, iters):
    import numpy as np
    import library  # noqa: F401  (oneDNN ISA cap before mindspore loads)
    import mindspore as ms
    from mindspore import nn, ops
    from library import layers
    from library.attention import ScaledDotProductAttention

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

    class Head(nn.Cell):
        def __init__(self, layer, kind):
            super().__init__()
            self.layer = layer
            self.kind = kind
            self.softmax = ops.Softmax(-1)

        def construct(self, x):
            if self.kind == "sum":
                return x.sum()
            if self.kind == "attention":
                y = self.layer(x, x, x)
            elif self.kind == "softmax":
                y = self.softmax(x)
            else:
                y = self.layer(x)
            return y.reshape(-1)[:HEAD]

    class _Nearest(nn.Cell):
        def construct(self, x):
            return layers.upsample_nearest2x(x)

    def layer(kind, shape, p):
        if kind == "conv":
            return layers.Conv2d(shape[1], p, 3, padding=1)
        if kind == "groupnorm":
            return layers.GroupNorm(p, shape[1], eps=1e-6)
        if kind == "linear":
            return layers.Linear(shape[-1], p)
        if kind == "layernorm":
            return layers.LayerNorm(shape[-1])
        if kind == "upsample":  # Upsample2D's interpolation alone: its conv has its own rows
            return _Nearest()
        return {"silu": layers.SiLU, "gelu": layers.GELU, "attention": lambda: ScaledDotProductAttention(p),
                "softmax": layers.Identity, "sum": layers.Identity}[kind]()

    rng = np.random.default_rng(0)
    out = {}
    for name in names:
        kind, shape, p = CASES[name]
        cell = Head(layer(kind, shape, p), kind)
        cell.set_train(False)
        x = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
        out[name] = _time(lambda: cell(x).asnumpy(), iters)
        print(name, out[name], file=sys.stderr, flush=True)
    return out


def worker_torch(names, iters):
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_grad_enabled(False)

    def attention(p):
        def run(x):
            b, n, hd = x.shape
            q = x.view(b, n, p, hd // p).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b, n, hd)
        return run

    def layer(kind, shape, p):
        return {
            "conv": lambda: torch.nn.Conv2d(shape[1], p, 3, padding=1),
            "groupnorm": lambda: torch.nn.GroupNorm(p, shape[1], eps=1e-6),
            "linear": lambda: torch.nn.Linear(shape[-1], p),
            "layernorm": lambda: torch.nn.LayerNorm(shape[-1]),
            "upsample": lambda: (lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest")),
            "silu": lambda: F.silu,
            "gelu": lambda: F.gelu,
            "attention": lambda: attention(p),
            "softmax": lambda: (lambda x: x.softmax(-1)),
            "sum": lambda: (lambda x: x),
        }[kind]()

    rng = np.random.default_rng(0)
    out = {}
    for name in names:
        kind, shape, p = CASES[name]
        f = layer(kind, shape, p)
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        reduce = (lambda y: y.sum()) if kind == "sum" else (lambda y: y.reshape(-1)[:HEAD].clone())
        out[name] = _time(lambda: reduce(f(x)).numpy(), iters)
        print(name, out[name], file=sys.stderr, flush=True)
    return out


WORKERS = {"mindspore": worker_mindspore, "torch": worker_torch}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=None,
                   help="substrings of case names to run (default: all): " + "; ".join(CASES))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--worker", choices=list(WORKERS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    names = [n for n in CASES if args.cases is None or any(c in n for c in args.cases)]
    if not names:
        p.error(f"no case matches {args.cases}")
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](names, args.iters)))
        return
    selection = ["--cases"] + names if args.cases else []
    results = {side: bench_common.run_worker(__file__, ["--worker", side, "--iters", str(args.iters)] + selection)
               for side in WORKERS}
    print(f"single layers, fp32 forward, best of {args.iters} calls (seconds; first call compiles)")
    print(f"{'case':34s} {'MindSpore':>10s} {'torch':>8s} {'ratio':>6s}")
    for name in names:
        ms_t = results["mindspore"].get(name, (None, None))[1]
        pt_t = results["torch"].get(name, (None, None))[1]
        ratio = ms_t / pt_t if ms_t and pt_t else None
        print(f"{name:34s} {bench_common.fmt(ms_t, '.4f'):>10s} {bench_common.fmt(pt_t, '.4f'):>8s} "
              f"{bench_common.fmt(ratio):>6s}")


if __name__ == "__main__":
    main()
