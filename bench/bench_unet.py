"""UNet speed and memory: MindSpore graph vs PyNative vs torch diffusers, same weights.

    python bench/bench_unet.py                 # mid config only
    python bench/bench_unet.py --configs mid full --pynative_full

Each measurement runs in its own process so peak RSS is that run's alone. The
torch reference (diffusers UNet2DConditionModel, SDXL settings) is created
with a fixed seed and its weights written to a safetensors file in
diffusers' layout; the MindSpore model loads the same file through the
diffusers -> SAI key conversion, so both run the same weights, and the bench
prints the max output difference as a sanity check.

Measured: compile time (first graph-mode call minus a steady call), s/iter of
the forward and of forward+backward (gradient w.r.t. the input latents only,
base weights frozen, as in LoRA training), peak RSS of the process. Batch 1,
64x64 latents (512x512 images) unless --latent is given.
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
from bench_common import fmt, peak_rss_gb  # noqa: E402,F401

CONFIGS = {
    # SDXL base 1.0
    "full": dict(model_channels=320, channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10)),
    # same topology, ~1/10 the compute
    "mid": dict(model_channels=128, channel_mult=(1, 2, 4), transformer_depth=(0, 1, 2)),
}



def diffusers_config(cfg):
    mc = cfg["model_channels"]
    chans = [mc * m for m in cfg["channel_mult"]]
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=chans, norm_num_groups=32, cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=list(cfg["transformer_depth"]),
        attention_head_dim=[c // 64 for c in chans], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)


def inputs(latent, seed=1):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 4, latent, latent)).astype(np.float32)
    t = np.array([500], np.int64)
    ctx = rng.standard_normal((1, 77, 2048)).astype(np.float32)
    pooled = rng.standard_normal((1, 1280)).astype(np.float32)
    time_ids = np.array([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], np.float32)
    return x, t, ctx, pooled, time_ids


def timed(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


# --------------------------------------------------------------------------- workers

def worker_prepare(args):
    import torch
    from diffusers import UNet2DConditionModel

    from library.safetensors_io import write_safetensors

    torch.manual_seed(0)
    model = UNet2DConditionModel(**diffusers_config(CONFIGS[args.config]))
    # streamed one tensor at a time: full SDXL is 10 GB in fp32, a second copy would not fit
    entries = [(k, "F32", tuple(v.shape), (lambda v=v: v.detach().numpy())) for k, v in model.state_dict().items()]
    write_safetensors(args.weights, entries)
    return {"params": sum(p.numel() for p in model.parameters())}


def worker_torch(args):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    torch.set_num_threads(os.cpu_count())
    with torch.device("meta"):
        model = UNet2DConditionModel(**diffusers_config(CONFIGS[args.config]))
    model.load_state_dict(load_file(args.weights), assign=True)
    model.eval().requires_grad_(False)
    x, t, ctx, pooled, time_ids = (torch.from_numpy(a) for a in inputs(args.latent))
    cond = {"text_embeds": pooled, "time_ids": time_ids}

    def fwd():
        with torch.no_grad():
            return model(x, t, ctx, added_cond_kwargs=cond).sample

    def fwd_bwd():
        xg = x.clone().requires_grad_(True)
        model(xg, t, ctx, added_cond_kwargs=cond).sample.square().mean().backward()
        return xg.grad

    out = fwd().numpy()
    fwd()
    res = {"fwd": timed(fwd, args.iters), "fwd_bwd": None}
    if not args.forward_only:
        fwd_bwd()
        res["fwd_bwd"] = timed(fwd_bwd, args.iters)
    res["rss"] = peak_rss_gb()
    import numpy as np
    np.save(args.out_array, out)
    return res


def worker_ms(args):
    import library  # noqa: F401  (CPU ISA env before mindspore)
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor
    from safetensors import safe_open

    from library import layers
    from library.device_utils import setup_device
    from library.sdxl_model_util import convert_diffusers_unet_state_dict_to_sdxl
    from library.sdxl_original_unet import SdxlUNet2DConditionModel, get_size_embeddings

    setup_device("CPU", pynative=args.mode == "pynative")
    with layers.skip_init():
        unet = SdxlUNet2DConditionModel(**CONFIGS[args.config])
    unet.set_train(False)
    if args.checkpointing:
        unet.set_gradient_checkpointing(True)
    params = {p.name: p for p in unet.get_parameters()}
    with safe_open(args.weights, "np") as f:  # one tensor at a time: no second full copy
        # the converter passes values through, so converting {key: key} gives the name map
        for name, key in convert_diffusers_unet_state_dict_to_sdxl({k: k for k in f.keys()}).items():
            params[name].set_data(Tensor(f.get_tensor(key)))
    for p in unet.get_parameters():
        p.requires_grad = False

    x, t, ctx, pooled, time_ids = inputs(args.latent)
    y = np.concatenate([pooled, get_size_embeddings(time_ids[:, 0:2], time_ids[:, 2:4], time_ids[:, 4:6])], -1)
    x, t, ctx, y = Tensor(x), Tensor(t.astype(np.int32)), Tensor(ctx), Tensor(y.astype(np.float32))

    def loss_fn(x_in):
        return unet(x_in, t, ctx, y).square().mean()

    grad_fn = ms.grad(loss_fn)
    if args.mode == "graph":
        grad_fn = ms.jit(grad_fn)

    res = {"fwd": None, "fwd_compile": None, "max_err": None}
    if args.backward_only:  # peak RSS of the training graph alone
        args.forward_only = False
    else:
        start = time.perf_counter()
        out = unet(x, t, ctx, y).asnumpy()
        first = time.perf_counter() - start
        res["fwd"] = timed(lambda: unet(x, t, ctx, y).asnumpy(), args.iters)
        res["fwd_compile"] = max(first - res["fwd"], 0.0)
        if os.path.exists(args.ref_array):
            res["max_err"] = float(np.abs(out - np.load(args.ref_array)).max())
    res["fwd_bwd"] = res["fwd_bwd_compile"] = None
    if not args.forward_only:
        start = time.perf_counter()
        grad_fn(x).asnumpy()
        first = time.perf_counter() - start
        res["fwd_bwd"] = timed(lambda: grad_fn(x).asnumpy(), args.iters)
        res["fwd_bwd_compile"] = max(first - res["fwd_bwd"], 0.0)
    res["rss"] = peak_rss_gb()
    return res


# --------------------------------------------------------------------------- driver

def run_worker(kind, config, extra, env=None):
    return bench_common.run_worker(__file__, ["--worker", kind, "--config", config] + extra, env)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["mid"], choices=list(CONFIGS))
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--pynative_full", action="store_true", help="also time PyNative at full size (slow)")
    p.add_argument("--checkpointing_full", action="store_true",
                   help="also time gradient checkpointing at full size")
    p.add_argument("--backward_only", action="store_true",
                   help="MindSpore rows time only forward+backward, so peak RSS is the training graph's")
    p.add_argument("--forward_only", action="store_true", help="skip forward+backward (memory-bound machines)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench", "results"))
    # worker-only
    p.add_argument("--worker", default=None)
    p.add_argument("--config", default="mid")
    p.add_argument("--mode", default="graph")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--weights", default=None)
    p.add_argument("--out_array", default=None)
    p.add_argument("--ref_array", default="")
    args = p.parse_args()

    if args.worker:
        fn = {"prepare": worker_prepare, "torch": worker_torch, "ms": worker_ms}[args.worker]
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return

    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for config in args.configs:
        weights = os.path.join(args.workdir, f"unet_{config}.safetensors")
        ref = os.path.join(args.workdir, f"unet_{config}_torch_out.npy")
        common = ["--weights", weights, "--latent", str(args.latent), "--iters", str(args.iters)]
        if args.forward_only:
            common.append("--forward_only")
        ms_extra = ["--backward_only"] if args.backward_only else []
        info = run_worker("prepare", config, common)
        print(f"[{config}] {info.get('params', 0) / 1e6:.0f} M parameters", flush=True)
        torch_res = run_worker("torch", config, common + ["--out_array", ref])
        rows.append((config, "torch (diffusers)", torch_res))
        modes = ["graph"] + (["pynative"] if config != "full" or args.pynative_full else [])
        for mode in modes:
            res = run_worker("ms", config, common + ms_extra + ["--mode", mode, "--ref_array", ref])
            rows.append((config, f"mindspore {mode}", res))
        if config != "full" or args.checkpointing_full:
            res = run_worker("ms", config, common + ms_extra + ["--mode", "graph", "--checkpointing", "--ref_array", ref])
            rows.append((config, "mindspore graph + checkpointing", res))
        if os.path.exists(weights):
            os.remove(weights)

    header = ("config", "impl", "compile fwd s", "fwd s/it", "compile f+b s", "fwd+bwd s/it",
              "peak RSS GB", "fwd vs torch", "f+b vs torch", "max|diff|")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    torch_by_cfg = {c: r for c, impl, r in rows if impl.startswith("torch")}
    for config, impl, r in rows:
        if "error" in r:
            print(f"| {config} | {impl} | {r['error']} |")
            continue
        tr = torch_by_cfg.get(config, {})
        ratio_f = r["fwd"] / tr["fwd"] if r.get("fwd") and tr.get("fwd") else None
        ratio_b = r["fwd_bwd"] / tr["fwd_bwd"] if r.get("fwd_bwd") and tr.get("fwd_bwd") else None
        print(f"| {config} | {impl} | {fmt(r.get('fwd_compile'), '.1f')} | {fmt(r.get('fwd'), '.3f')} | "
              f"{fmt(r.get('fwd_bwd_compile'), '.1f')} | {fmt(r.get('fwd_bwd'), '.3f')} | {fmt(r['rss'])} | "
              f"{fmt(ratio_f)}x | {fmt(ratio_b)}x | {fmt(r.get('max_err'), '.2e')} |")


if __name__ == "__main__":
    main()
