"""Full-size SDXL checkpoint load: seconds and peak RSS of load_models_from_sdxl_checkpoint.

    python bench/bench_sdxl_checkpoint.py --file /tmp/sdxl_random.safetensors --generate
    python bench/bench_sdxl_checkpoint.py --file sd_xl_base_1.0.safetensors

``--generate`` writes a random SDXL-shaped SAI file (fp16, ~7 GB, streamed) when the file is
missing. The load runs in a child process so that its peak RSS (VmHWM) is the load's alone;
"model" is the bytes of the loaded parameters, "ratio" peak RSS / model bytes (the target for an
fp16 file into fp32 models is <= 1.5). ``--dump`` also writes small forward outputs (tests),
``--save`` writes the loaded models back (fp16) and reports the save time.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_common import ensure_sdxl_file, peak_rss_gb, rss_gb  # noqa: E402


def child(args):
    import library  # noqa: F401
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor

    ms.set_context(mode=ms.PYNATIVE_MODE)
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint, save_stable_diffusion_checkpoint

    base = rss_gb()
    t0 = time.time()
    te1, te2, vae, unet, logit_scale, info = load_models_from_sdxl_checkpoint(args.file, dtype=args.dtype)
    seconds = time.time() - t0
    peak = peak_rss_gb()
    model_bytes = sum(p.asnumpy().nbytes for m in (te1, te2, vae, unet) for p in m.get_parameters())
    result = dict(file=args.file, file_gb=os.path.getsize(args.file) / 1024 ** 3, load_s=seconds,
                  base_rss_gb=base, peak_rss_gb=peak, model_gb=model_bytes / 1024 ** 3,
                  ratio=peak / (model_bytes / 1024 ** 3),
                  ratio_over_base=(peak - base) / (model_bytes / 1024 ** 3))
    if args.dump:
        rng = np.random.default_rng(0)
        ids1 = np.full((1, 77), 49407, np.int64)
        ids2 = np.zeros((1, 77), np.int64)
        text = rng.integers(1, 49406, 12)
        for ids in (ids1, ids2):
            ids[0, 0] = 49406
            ids[0, 1:13] = text
            ids[0, 13] = 49407
        o1, o2 = te1(Tensor(ids1)), te2(Tensor(ids2))
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        ctx = rng.standard_normal((1, 77, 2048)).astype(np.float32)
        y = rng.standard_normal((1, 2816)).astype(np.float32)
        t = np.array([500.0], np.float32)
        out = unet(Tensor(x), Tensor(t), Tensor(ctx), Tensor(y))
        dec = vae.decode(Tensor(x))
        np.savez(args.dump, ids1=ids1, ids2=ids2, x=x, ctx=ctx, y=y, t=t,
                 te1_h11=o1[-1][11].asnumpy(), te1_last=o1[0].asnumpy(),
                 te2_hm2=o2[-1][-2].asnumpy(), te2_embeds=o2[2].asnumpy(),
                 unet=out.asnumpy(), vae_dec=dec.asnumpy(), logit_scale=np.asarray(logit_scale))
    if args.save:
        t0 = time.time()
        save_stable_diffusion_checkpoint(args.save, te1, te2, unet, 0, 0, info, vae, logit_scale, None,
                                         save_dtype="fp16")
        result["save_s"] = time.time() - t0
    print("RESULT " + json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", required=True)
    parser.add_argument("--generate", action="store_true", help="write a random SDXL-shaped fp16 file if missing")
    parser.add_argument("--dtype", default=None, help="model dtype for U-Net/VAE (default fp32)")
    parser.add_argument("--dump", default=None, help="npz of small forward outputs (for tests)")
    parser.add_argument("--save", default=None, help="save the loaded models back to this file (fp16)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    ensure_sdxl_file(args.file, args.generate, parser)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--file", args.file]
    for flag in ("dtype", "dump", "save"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        sys.exit(proc.returncode or 1)
    r = json.loads(lines[-1][7:])
    print(f"{'file GB':>8} {'load s':>7} {'base GB':>8} {'peak GB':>8} {'model GB':>9} {'peak/model':>10} "
          f"{'(peak-base)/model':>18}" + (f" {'save s':>7}" if "save_s" in r else ""))
    print(f"{r['file_gb']:8.2f} {r['load_s']:7.1f} {r['base_rss_gb']:8.2f} {r['peak_rss_gb']:8.2f} "
          f"{r['model_gb']:9.2f} {r['ratio']:10.2f} {r['ratio_over_base']:18.2f}"
          + (f" {r['save_s']:7.1f}" if "save_s" in r else ""))
    print("RESULT " + json.dumps(r))


if __name__ == "__main__":
    main()
