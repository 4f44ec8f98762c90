"""Full-size SDXL LoRA training step on this machine: s/step, compile time and peak RSS of
``sdxl_train_network.py`` itself (a real run in a child process, on a real SAI checkpoint file), beside
the same step in torch (diffusers' U-Net from the same file) in the same invocation.

    python bench/bench_train.py --file /tmp/sdxl_random.safetensors --generate
    python bench/bench_train.py --file sd_xl_base_1.0.safetensors --resolution 256

Default case: U-Net LoRA only, rank 8 (alpha 1), gradient checkpointing (the segmented step),
512x512 (64x64 latents), batch 1, cached latents and text encoder outputs (the trainer reads the U-Net
once the caches are filled and the text encoders freed), fp32 compute. ``--fp16_unet_weights`` keeps the frozen U-Net
weights in fp16 on the MindSpore side (torch keeps fp32 weights). ``--pynative`` runs the step in
PyNative mode. ``--generate`` writes a random SDXL-shaped SAI file (fp16, ~7 GB) when it is missing.

The torch row: diffusers' UNet2DConditionModel with the file's weights (fp32), the same rank of LoRA
on kohya's U-Net targets (every Linear of the transformer blocks, proj_in/proj_out), torch's
gradient checkpointing, AdamW, the same latent size, timesteps drawn alike (``--skip_torch`` leaves
it out). "compile s" is the first step (graph compile + one step), "s/step" the mean of the later
steps, "peak GB" the process's peak RSS (the checkpoint load included), "steps GB" the peak during
the training steps. The MindSpore row also prints where a step's time goes (per segment kind:
forward, recompute+backward; the update; Python between the graph calls). ``--profile`` adds the
seconds per step by op class (``bench/op_classes.py``) on both sides and the op types with the most
time: the trainer runs once to fill the disk caches, then again under MindSpore's CPU profiler
(``MS_PROFILER_OPTIONS``); torch profiles its steps after the first with ``torch.profiler``.
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
sys.path.insert(0, os.path.join(ROOT, "tests"))  # sdxl_checkpoint_helpers: the torch reference's loader

from bench_common import ensure_sdxl_file, fmt, run_worker  # noqa: E402


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
    env = None
    if args.profile:  # a first run fills the disk caches: the profiled run's ops are the steps' alone
        cmd += ["--cache_latents_to_disk"] + ([] if args.no_cache_text_encoder_outputs
                                              else ["--cache_text_encoder_outputs_to_disk"])
        warm_cmd = list(cmd)
        warm_cmd[warm_cmd.index("--max_train_steps") + 1] = "1"
        warm = subprocess.run(warm_cmd, capture_output=True, text=True)
        if warm.returncode != 0:
            sys.stderr.write(warm.stderr[-4000:])
            return {"error": f"cache run exit {warm.returncode}"}
        env = dict(os.environ, MS_PROFILER_OPTIONS=json.dumps({"start": True,
                                                                "output_path": os.path.join(work, "profile")}))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": f"exit {proc.returncode}", "peak_rss_gb": peak, "wall_s": wall}
    summary = json.loads(next(line for line in reversed(proc.stdout.strip().splitlines())
                              if line.startswith("model saved:")).split("; ", 1)[1])
    compile_s = next(iter(summary["compile_s"].values()))
    result = {"compile_s": compile_s, "s_per_step": summary["s_per_step"], "peak_rss_gb": peak,
              "steps_peak_rss_gb": summary.get("steps_peak_rss_gb"), "wall_s": wall,
              "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
              "segmented_step_s": summary.get("segmented_step_s"), "num_graphs": summary.get("num_graphs")}
    if args.profile:
        from op_classes import mindspore_op_seconds

        classes, top = mindspore_op_seconds(os.path.join(work, "profile"))
        per_step = {k: v / args.steps for k, v in classes.items()}
        result["top_ops"] = [(c, t, v / args.steps) for c, t, v in top]
        update = (summary.get("segmented_step_s") or {}).get("update", 0.0)
        moved = min(update, per_step["elementwise"])
        per_step["elementwise"] -= moved
        per_step["optimizer update"] += moved
        result["op_s"] = per_step
    return result


def worker_torch(args):
    """The same training step in torch; prints RESULT json."""
    import numpy as np
    import torch

    import sdxl_checkpoint_helpers as H
    from bench_common import peak_rss_gb
    from bench_inference import FULL
    from library.device_utils import reset_peak_rss

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet, _ = H.diffusers_unet_from_sai(args.file, FULL["unet"])
    unet.requires_grad_(False)

    class LoRALinear(torch.nn.Module):
        def __init__(self, org, rank):
            super().__init__()
            self.org = org
            self.down = torch.nn.Linear(org.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, org.out_features, bias=False)
            torch.nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
            torch.nn.init.zeros_(self.up.weight)
            self.scale = 1.0 / rank  # alpha 1, as the MindSpore run

        def forward(self, x):
            return self.org(x) + self.up(self.down(x)) * self.scale

    params = []
    for name, module in list(unet.named_modules()):
        if type(module).__name__ != "Transformer2DModel":
            continue
        for child_name, child in list(module.named_modules()):
            if isinstance(child, torch.nn.Linear):
                parent = module.get_submodule(child_name.rsplit(".", 1)[0]) if "." in child_name else module
                lora = LoRALinear(child, args.network_dim)
                setattr(parent, child_name.rsplit(".", 1)[-1], lora)
                params += [lora.down.weight, lora.up.weight]
    unet.train()
    unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    h = args.resolution // 8
    context = torch.from_numpy(rng.standard_normal((1, 77, 2048), dtype=np.float32))
    added = {"text_embeds": torch.from_numpy(rng.standard_normal((1, 1280), dtype=np.float32)),
             "time_ids": torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]],
                                      dtype=torch.float32)}
    reset = reset_peak_rss()
    times = []
    profiler = None
    for step in range(args.steps):
        if args.profile and step == 1:  # the steps after the first, as the MindSpore side's per-step mean
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        latents = torch.from_numpy(rng.standard_normal((1, 4, h, h), dtype=np.float32))
        noise = torch.from_numpy(rng.standard_normal((1, 4, h, h), dtype=np.float32))
        t = torch.tensor([int(rng.integers(0, 1000))])
        t1 = time.perf_counter()
        pred = unet(latents + noise, t, context, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t1)
        print(f"torch step {len(times)}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    later = times[1:] or times
    result = {"compile_s": times[0], "s_per_step": sum(later) / len(later), "load_s": load_s,
              "peak_rss_gb": peak_rss_gb(), "steps_peak_rss_gb": reset and peak_rss_gb(), "lora_tensors": len(params)}
    if profiler is not None:
        from op_classes import torch_op_seconds

        profiler.__exit__(None, None, None)
        classes, top = torch_op_seconds(profiler)
        result["op_s"] = {k: v / len(later) for k, v in classes.items()}
        result["top_ops"] = [(c, t, v / len(later)) for c, t, v in top]
    print("RESULT " + json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", required=True, help="SDXL SAI checkpoint (.safetensors)")
    parser.add_argument("--generate", action="store_true", help="write a random SDXL-shaped fp16 file if missing")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="training steps (the first one compiles)")
    parser.add_argument("--network_dim", type=int, default=8)
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
    parser.add_argument("--skip_torch", action="store_true", help="no torch row")
    parser.add_argument("--profile", action="store_true",
                        help="op-class profile of the steps (MindSpore's CPU profiler, torch.profiler); the "
                             "MindSpore side first runs once to fill the disk caches")
    parser.add_argument("--worker", choices=["torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "torch":
        import library  # noqa: F401  (CPU ISA env, as the MindSpore side)
        return worker_torch(args)
    ensure_sdxl_file(args.file, args.generate, parser)
    with tempfile.TemporaryDirectory() as work:
        r = run_training(args, work)
    tr = None
    if not args.skip_torch:  # after the MindSpore run: one heavy process at a time
        tr = run_worker(__file__, ["--worker", "torch", "--file", args.file, "--resolution", str(args.resolution),
                                   "--steps", str(args.steps), "--network_dim", str(args.network_dim)]
                        + (["--profile"] if args.profile else []))
    case = (f"SDXL U-Net LoRA dim {args.network_dim}, {args.resolution}px, batch 1, "
            f"{'no checkpointing' if args.no_checkpointing else 'checkpointing'}, mixed_precision {args.mixed_precision}"
            + (f", jit_level {args.jit_level}" if args.jit_level else "") + (", mem_eff_attn" if args.mem_eff_attn else "")
            + (", fp16 U-Net weights" if args.fp16_unet_weights else "") + (", PyNative" if args.pynative else "")
            + (", text encoder outputs cached" if not args.no_cache_text_encoder_outputs else ""))
    print(case)
    print(f"{'':16} {'compile s':>10} {'s/step':>8} {'peak GB':>8} {'steps GB':>9}")
    rows = [("MindSpore", r)] + ([("torch", tr)] if tr is not None else [])
    for name, row in rows:
        print(f"{name:16} {fmt(row.get('compile_s'), '.1f'):>10} {fmt(row.get('s_per_step'), '.1f'):>8} "
              f"{fmt(row.get('peak_rss_gb'), '.2f'):>8} {fmt(row.get('steps_peak_rss_gb'), '.2f'):>9}"
              + (f"  {row['error']}" if "error" in row else ""))
    if tr is not None and r.get("s_per_step") and tr.get("s_per_step"):
        print(f"ratio MindSpore / torch: s/step {r['s_per_step'] / tr['s_per_step']:.2f}")
    if r.get("segmented_step_s"):
        print("MindSpore step, mean seconds per step by segment kind:")
        for k, v in sorted(r["segmented_step_s"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:40} {v:8.2f}")
    if r.get("op_s"):
        print_op_classes(r, tr)
    print("RESULT " + json.dumps(dict(r, case=case, torch=tr)))


def print_op_classes(r, tr):
    """Seconds per step by op class, MindSpore beside torch; "between ops" is the step time no kernel
    accounts for (Python, the runtime's launches, the profilers' own cost)."""
    from op_classes import CLASSES

    t_ops = (tr or {}).get("op_s")
    print("seconds per step by op class (profilers on)")
    print(f"  {'':22} {'MindSpore':>10} {'torch':>8} {'ratio':>6}")
    rows = [(c, r["op_s"][c], t_ops and t_ops[c]) for c in CLASSES]
    rows.append(("between ops", r["s_per_step"] - sum(r["op_s"].values()),
                 t_ops and tr["s_per_step"] - sum(t_ops.values())))
    for name, ms_s, t_s in rows:
        ratio = ms_s / t_s if t_s else None
        print(f"  {name:22} {ms_s:10.2f} {fmt(t_s):>8} {fmt(ratio):>6}")
    for side, row in (("MindSpore", r), ("torch", tr or {})):
        if row.get("top_ops"):
            print(f"{side}: op types with the most time, seconds per step")
            for c, t, v in row["top_ops"]:
                print(f"  {t[:48]:48} {c:18} {v:8.2f}")


if __name__ == "__main__":
    main()
