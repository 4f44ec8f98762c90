"""SDXL VAE decode speed and memory: MindSpore (graph / PyNative, chunked or plain mid attention)
vs torch diffusers, full SDXL VAE config, random weights.

    python bench/bench_vae.py                       # 128x128 latent (1024x1024 image), ms graph chunked + torch
    python bench/bench_vae.py --latent 64 --runs ms_graph ms_graph_plain torch

Each run is its own process, so peak RSS (VmHWM) is that run's alone. Reported: first call
(graph compile + run) and the mean of --iters steady calls, in seconds, and peak RSS in GB.

Measured 2026-11-26 (MindSpore 2.10 CPU, 2 shared cores): graph mode keeps the intermediates of
library.layers.GroupNorm alive (its mean/variance broadcast pattern is not memory-reused on CPU), so a
graph-mode decode needs ~2.7 GB at a 16x16 latent and ~8 GB at 32x32, growing with pixels; a 128x128
graph decode would need >100 GB. PyNative frees them. Use small --latent for ms_graph until that is fixed.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_common import peak_rss_gb  # noqa: E402

RUNS = ("ms_graph", "ms_graph_plain", "ms_pynative", "torch")


def child(run, latent, iters, chunk):
    import numpy as np

    z = np.random.default_rng(0).standard_normal((1, 4, latent, latent)).astype(np.float32)
    if run == "torch":
        import torch
        try:
            from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL as Ref
        except (ImportError, RuntimeError):  # transformers refusing the installed huggingface_hub
            import diffusers.utils.import_utils as import_utils
            import_utils._transformers_available = False
            from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL as Ref
        from library.autoencoder_kl import AutoencoderKLConfig

        model = Ref(**AutoencoderKLConfig().diffusers_kwargs()).eval()
        zt = torch.from_numpy(z)

        def call():
            with torch.no_grad():
                return model.decode(zt).sample.numpy()
    else:
        import library  # noqa: F401
        import mindspore as ms
        from library.autoencoder_kl import AutoencoderKLConfig, VAEDecode, create_vae

        ms.set_device("CPU")
        ms.set_context(mode=ms.PYNATIVE_MODE if run == "ms_pynative" else ms.GRAPH_MODE)
        config = AutoencoderKLConfig(attn_chunk_size=0 if run == "ms_graph_plain" else chunk)
        decode = VAEDecode(create_vae(config))
        zt = ms.Tensor(z)

        def call():
            return decode(zt).asnumpy()

    t0 = time.perf_counter()
    out = call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    steady = sum(times) / len(times) if times else float("nan")
    print(json.dumps(dict(run=run, latent=latent, first_s=first, steady_s=steady,
                          peak_rss_gb=peak_rss_gb(), out_shape=list(out.shape),
                          finite=bool(np.isfinite(out).all()))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=128, help="latent side (image side / 8)")
    parser.add_argument("--runs", nargs="+", default=["ms_graph", "torch"], choices=RUNS)
    parser.add_argument("--iters", type=int, default=1, help="steady-state calls after the first")
    parser.add_argument("--chunk", type=int, default=4096, help="attention query chunk (ms runs)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.latent, args.iters, args.chunk)
        return

    rows = []
    for run in args.runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", run, "--latent", str(args.latent),
               "--iters", str(args.iters), "--chunk", str(args.chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            rows.append(dict(run=run, error=f"rc={proc.returncode}: {' | '.join(tail)}"))
        else:
            rows.append(json.loads(lines[-1]))
        print(rows[-1], flush=True)

    side = args.latent * 8
    print(f"\nSDXL VAE decode, 1x4x{args.latent}x{args.latent} latent -> {side}x{side} image, CPU fp32")
    print(f"{'run':<16}{'first call s':>14}{'steady s':>10}{'peak RSS GB':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:<16}  {r['error']}")
        else:
            print(f"{r['run']:<16}{r['first_s']:>14.1f}{r['steady_s']:>10.1f}{r['peak_rss_gb']:>13.2f}")


if __name__ == "__main__":
    main()
