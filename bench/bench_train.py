"""Full-size SDXL LoRA training step on this machine: s/step, compile time and peak RSS of
``sdxl_train_network.py`` itself (a real run in a child process, on a real SAI checkpoint file).

    python bench/bench_train.py --file /tmp/sdxl_random.safetensors --generate
    python bench/bench_train.py --file sd_xl_base_1.0.safetensors --resolution 256

Default case (issue #6): U-Net LoRA only, dim 16, gradient checkpointing, 512x512 (64x64
latents), batch 1, cached latents and text encoder outputs (the text encoders' 3.1 GB are freed
before the step is compiled), fp32 (``--mixed_precision fp16`` needs more memory on CPU: its
fp16 matmuls run through fp32 copies of the frozen weights that live until the backward).
``--pynative`` runs the step in PyNative mode (the graph-mode step does not fit 23 GB at 512x512).
``--generate`` writes a random SDXL-shaped SAI file (fp16, ~7 GB) when the file is missing.
"compile s" is the first step (graph compile + one step), "s/step" the mean of the later steps,
"peak GB" the child's ru_maxrss.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_common import ensure_sdxl_file, fmt  # noqa: E402


def run_training(args, work):
    import make_tiny_train_demo as demo

    _, dataset = demo.write_dataset(work, 2, args.resolution)
    cmd = [sys.executable, os.path.join(ROOT, "sdxl_train_network.py"),
           "--pretrained_model_name_or_path", args.file, "--dataset_config", dataset,
           "--output_dir", os.path.join(work, "out"), "--output_name", "bench",
           "--network_module", "networks.lora", "--network_dim", str(args.network_dim), "--network_alpha", "1",
           "--network_train_unet_only", "--learning_rate", "1e-4", "--max_train_steps", str(args.steps),
           "--cache_latents", "--max_data_loader_n_workers", "0", "--seed", "0",
           "--mixed_precision", args.mixed_precision]
    if not args.no_checkpointing:
        cmd.append("--gradient_checkpointing")
    if args.mem_eff_attn:
        cmd.append("--mem_eff_attn")
    if args.fp16_unet_weights:
        cmd.append("--fp16_unet_weights")
    if not args.no_cache_text_encoder_outputs:
        cmd.append("--cache_text_encoder_outputs")
    if args.jit_level:
        cmd += ["--jit_level", args.jit_level]
    if args.pynative:
        cmd.append("--pynative")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": f"exit {proc.returncode}", "peak_rss_gb": peak, "wall_s": wall}
    summary = json.loads(proc.stdout.strip().splitlines()[-1].split("; ", 1)[1])
    compile_s = next(iter(summary["compile_s"].values()))
    return {"compile_s": compile_s, "s_per_step": summary["s_per_step"], "peak_rss_gb": peak, "wall_s": wall,
            "first_loss": summary["first_loss"], "last_loss": summary["last_loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", required=True, help="SDXL SAI checkpoint (.safetensors)")
    parser.add_argument("--generate", action="store_true", help="write a random SDXL-shaped fp16 file if missing")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="training steps (the first one compiles)")
    parser.add_argument("--network_dim", type=int, default=16)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16"])
    parser.add_argument("--no_checkpointing", action="store_true")
    parser.add_argument("--mem_eff_attn", action="store_true")
    parser.add_argument("--fp16_unet_weights", action="store_true",
                        help="frozen U-Net weights kept in fp16, computed in fp32 (half the weights' memory)")
    parser.add_argument("--no_cache_text_encoder_outputs", action="store_true",
                        help="encode the captions in every step (the text encoders stay in memory)")
    parser.add_argument("--jit_level", default=None, choices=[None, "O0", "O1", "O2"])
    parser.add_argument("--pynative", action="store_true",
                        help="train step in PyNative mode (no compile; each op's memory is freed when unused)")
    args = parser.parse_args()
    ensure_sdxl_file(args.file, args.generate, parser)
    with tempfile.TemporaryDirectory() as work:
        r = run_training(args, work)
    case = (f"SDXL U-Net LoRA dim {args.network_dim}, {args.resolution}px, batch 1, "
            f"{'no checkpointing' if args.no_checkpointing else 'checkpointing'}, mixed_precision {args.mixed_precision}"
            + (f", jit_level {args.jit_level}" if args.jit_level else "") + (", mem_eff_attn" if args.mem_eff_attn else "")
            + (", fp16 U-Net weights" if args.fp16_unet_weights else "") + (", PyNative" if args.pynative else "")
            + (", text encoder outputs cached" if not args.no_cache_text_encoder_outputs else ""))
    print(case)
    print(f"{'compile s':>10} {'s/step':>8} {'peak GB':>8} {'wall s':>8}")
    print(f"{fmt(r.get('compile_s'), '.1f'):>10} {fmt(r.get('s_per_step'), '.1f'):>8} "
          f"{fmt(r.get('peak_rss_gb'), '.2f'):>8} {fmt(r.get('wall_s'), '.0f'):>8}" + (f"  {r['error']}" if "error" in r else ""))
    print("RESULT " + json.dumps(dict(r, case=case)))


if __name__ == "__main__":
    main()
