"""Full-size SDXL: peak RSS and seconds of merging a U-Net LoRA into the U-Net (``LoRANetwork.merge_to``,
what ``sdxl_minimal_inference.py --lora_weights`` and ``networks/sdxl_merge_lora.py`` run).

    python bench/bench_merge.py --file /tmp/sdxl_random.safetensors --generate

The child loads the checkpoint, drops the text encoders and the VAE, writes a LoRA of ``--rank`` on
kohya's U-Net targets (random up weights), then measures the merge alone: "U-Net GB" is the U-Net's
parameter bytes, "before GB" the process's RSS just before the merge (the U-Net, the LoRA and the
runtime), "peak GB" the peak RSS during the merge (VmHWM reset before it), "ratio" peak / U-Net (target
<= 1.1: one merged weight at a time besides the model).
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_common import ensure_sdxl_file, fmt, run_worker  # noqa: E402


def child(args):
    import library  # noqa: F401
    import numpy as np
    import mindspore as ms

    from library.device_utils import peak_rss_gb, release_host_memory, reset_peak_rss, rss_gb
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint
    from networks import lora

    ms.set_context(mode=ms.PYNATIVE_MODE)
    te1, te2, vae, unet, _, _ = load_models_from_sdxl_checkpoint(args.file)
    del te1, te2, vae
    release_host_memory()
    unet_gb = sum(p.asnumpy().nbytes for p in unet.get_parameters()) / 1024 ** 3
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "lora.safetensors")
        rng = np.random.default_rng(0)
        sd = {}
        for name, cell in unet.cells_and_names():  # kohya's U-Net targets: Linear layers inside transformers
            if type(cell).__name__ == "Linear" and (".transformer_blocks." in name
                                                     or name.endswith(("proj_in", "proj_out"))):
                key = "lora_unet_" + name.replace(".", "_")
                out_f, in_f = cell.weight.shape
                sd[key + ".lora_down.weight"] = (rng.standard_normal((args.rank, in_f)) * 0.01).astype(np.float32)
                sd[key + ".lora_up.weight"] = (rng.standard_normal((out_f, args.rank)) * 0.01).astype(np.float32)
                sd[key + ".alpha"] = np.float32(args.rank)
        from library.lora_file import save_state_dict_file

        save_state_dict_file(path, sd, {})
        del sd
        release_host_memory()
        network, weights_sd = lora.create_network_from_weights(1.0, path, None, [], unet, for_inference=True)
        release_host_memory()
        before = rss_gb()
        reset_peak_rss()
        t0 = time.time()
        network.merge_to([], unet, weights_sd)
        seconds = time.time() - t0
        peak = peak_rss_gb()
    print("RESULT " + json.dumps({"unet_gb": unet_gb, "merge_s": seconds, "peak_rss_gb": peak, "before_gb": before,
                                  "modules": len(network.unet_loras)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", required=True)
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    ensure_sdxl_file(args.file, args.generate, parser)
    r = run_worker(__file__, ["--child", "--file", args.file, "--rank", str(args.rank)])
    print(f"U-Net LoRA rank {args.rank} merged into the full SDXL U-Net (fp32)")
    print(f"{'modules':>8} {'U-Net GB':>9} {'before GB':>10} {'peak GB':>8} {'ratio':>6} {'merge s':>8}")
    ratio = r["peak_rss_gb"] / r["unet_gb"] if "peak_rss_gb" in r else None
    print(f"{r.get('modules', '-'):>8} {fmt(r.get('unet_gb')):>9} {fmt(r.get('before_gb')):>10} "
          f"{fmt(r.get('peak_rss_gb')):>8} {fmt(ratio):>6} "
          f"{fmt(r.get('merge_s'), '.1f'):>8}" + (f"  {r['error']}" if "error" in r else ""))
    print("RESULT " + json.dumps(r))


if __name__ == "__main__":
    main()
