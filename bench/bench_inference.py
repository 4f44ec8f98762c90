"""SDXL text-to-image seconds per image: sdxl_minimal_inference (MindSpore, graph mode) beside torch
diffusers' StableDiffusionXLPipeline, same weights, prompt, Euler sampler, steps, size and initial noise.

    python bench/bench_inference.py                          # full SDXL, 1024x1024, 30 steps (~20 GB RAM)
    python bench/bench_inference.py --run_steps 2 --fp16_unet_weights    # what fits 24 GB, minutes per step
    python bench/bench_inference.py --config tiny --size 256 --steps 4    # smoke run, seconds

Without ``--model`` a random-weight model of the chosen configuration is written once as a diffusers
folder (``--cache``, fp16 on disk for ``full``, about 7 GB); with ``--model`` a diffusers folder is used
(both sides need one: diffusers cannot read an SAI single file offline). Each side runs in its own
process (peak RSS is that side's alone). Guidance 7 (both CFG branches in one U-Net batch on both
sides), fp32. Each side times its parts: the prompt encoding and the VAE decode twice (the first
MindSpore decode compiles its graph; the prompt encoding runs in PyNative), every denoising step (the
first MindSpore step compiles the U-Net step); the timings also go to stderr as they come. As
``sdxl_minimal_inference.py`` does, the MindSpore side drops the text encoders after the encoding and
the U-Net (weights and compiled step) before decoding. s/image = encode + ``--steps`` x s/step + decode,
with s/step the mean of the steps after the first; "first image" adds the compile overheads. Every step of a
schedule costs the same, so ``--run_steps K`` (K >= 2) runs only the first K steps of the ``--steps``
schedule (a full-size 1024x1024 step takes minutes on a small CPU) and the table says so. With
``--fp16_unet_weights`` the 1024x1024 MindSpore side fits a 24 GB machine (README benchmarks). The last column is the
max difference of the latents after the steps run (the same initial noise on both sides).

Do not run the full configuration on a shared machine: it needs ~20 GB of RAM per process and minutes
per step on CPU.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402
from bench_common import fmt, peak_rss_gb  # noqa: E402,F401

PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"

FULL = dict(
    unet=dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816, norm_num_groups=32, sample_size=128),
    vae=dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             latent_channels=4, norm_num_groups=32, scaling_factor=0.13025, sample_size=1024),
    te1=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
             eos_token_id=49407, pad_token_id=49407),
    te2=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
             bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
)
TINY = dict(
    unet=dict(FULL["unet"], block_out_channels=(64, 128, 256), attention_head_dim=(1, 2, 4),
              transformer_layers_per_block=(1, 1, 1), cross_attention_dim=192, addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=32 + 48, sample_size=32),
    vae=dict(FULL["vae"], block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=256),
    te1=dict(FULL["te1"], hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
             projection_dim=64),
    te2=dict(FULL["te2"], hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
             projection_dim=32),
)
CONFIGS = {"full": FULL, "tiny": TINY}



# --------------------------------------------------------------------------- workers


def worker_prepare(args):
    """Random-weight model of the configuration -> diffusers folder (+ CLIP tokenizer files)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from library.clip_tokenizer import write_hf_tokenizer_files

    cfg = CONFIGS[args.config]
    dtype = torch.float16 if args.config == "full" else torch.float32
    torch.manual_seed(0)
    parts = (("unet", lambda: UNet2DConditionModel(**cfg["unet"])),
             ("vae", lambda: AutoencoderKL(**cfg["vae"])),
             ("text_encoder", lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["te1"]))),
             ("text_encoder_2", lambda: transformers.CLIPTextModelWithProjection(
                 transformers.CLIPTextConfig(**cfg["te2"]))))
    for name, build in parts:  # one model in memory at a time
        model = build()
        if name == "unet":
            with torch.no_grad():  # random weights: keep 30 steps of sampling finite
                model.conv_out.weight.mul_(0.3)
        model.to(dtype).save_pretrained(os.path.join(args.model, name), safe_serialization=True)
        del model
    write_hf_tokenizer_files(os.path.join(args.model, "tokenizer"))
    write_hf_tokenizer_files(os.path.join(args.model, "tokenizer_2"), pad_token="!")
    with open(os.path.join(args.model, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionXLPipeline"}, f)
    return {}


PHASE_PEAKS = {}  # the process's peak RSS when each timed part ended (which part raised the peak)


def _progress(what, seconds):
    """Each timing on stderr as it comes: a worker that runs out of memory later still shows them."""
    PHASE_PEAKS[what.split(" ")[0]] = peak_rss_gb()
    print(f"{what}: {seconds:.2f} s (peak RSS {peak_rss_gb():.2f} GB)", file=sys.stderr, flush=True)


def _timed(fn, *a, what="call"):
    t0 = time.perf_counter()
    out = fn(*a)
    seconds = time.perf_counter() - t0
    _progress(what, seconds)
    return out, seconds


def _stop_after(run_steps, times):
    """Step callback: record the time of each step, ask to stop after ``run_steps`` steps."""
    last = [time.perf_counter()]

    def on_step(i):
        now = time.perf_counter()
        times.append(now - last[0])
        _progress(f"step {i}", times[-1])
        last[0] = now
        return run_steps is not None and i + 1 >= run_steps

    return on_step, last


def worker_torch(args):
    import numpy as np
    import torch
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.set_num_threads(os.cpu_count())
    m = args.model
    t0 = time.perf_counter()
    tok_dir = lambda name: os.path.join(m, name) if os.path.isdir(os.path.join(m, name)) else args.tokenizers[name]
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(m, "vae"), torch_dtype=torch.float32),
        text_encoder=transformers.CLIPTextModel.from_pretrained(os.path.join(m, "text_encoder"),
                                                                torch_dtype=torch.float32),
        text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(
            os.path.join(m, "text_encoder_2"), torch_dtype=torch.float32),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir("tokenizer")),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tok_dir("tokenizer_2")),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(m, "unet"), torch_dtype=torch.float32),
        scheduler=EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    noise = torch.from_numpy(np.load(args.noise))

    def encode():
        with torch.no_grad():
            return pipe.encode_prompt(prompt=PROMPT, negative_prompt=NEGATIVE, do_classifier_free_guidance=True)

    (pe, npe, ppe, nppe), encode_first = _timed(encode, what="encode")
    _, encode_s = _timed(encode, what="encode")
    steps = []
    on_step, last = _stop_after(args.run_steps, steps)

    def callback(p, i, t, kwargs):
        if on_step(i):
            p._interrupt = True  # diffusers skips the remaining steps
        return {}

    last[0] = time.perf_counter()
    with torch.no_grad():
        latents = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                       negative_pooled_prompt_embeds=nppe, height=args.size, width=args.size,
                       num_inference_steps=args.steps, guidance_scale=7.0, latents=noise.clone(),
                       output_type="latent", callback_on_step_end=callback).images

    def decode():
        with torch.no_grad():
            return pipe.vae.decode(latents / pipe.vae.config.scaling_factor)

    _, decode_first = _timed(decode, what="decode")
    _, decode_s = _timed(decode, what="decode")
    np.save(args.out_array, latents.numpy())
    return {"load": load, "encode": encode_s, "encode_first": encode_first, "steps": steps, "decode": decode_s,
            "decode_first": decode_first, "rss": peak_rss_gb(), "phase_peaks": dict(PHASE_PEAKS)}


def worker_ms(args):
    import numpy as np

    import sdxl_minimal_inference as smi
    from library.device_utils import setup_device
    from library.sdxl_pipeline import size_conditioning
    from library.sdxl_schedulers import get_scheduler

    setup_device("CPU", pynative=args.pynative)
    t0 = time.perf_counter()
    te1, te2, vae, unet = smi.load_models(args.model, None, "fp16" if args.fp16_unet_weights else "fp32")
    gen = smi.Generator(te1, te2, vae, unet, sequential_guidance=args.sequential_guidance)
    del te1, te2, vae, unet  # the Generator holds the last references (released as one-shot generation does)
    gen.check_size(args.size, args.size)
    load = time.perf_counter() - t0
    _progress("load", load)
    noise = np.load(args.noise)

    def encode():
        context, pooled = gen.encode([NEGATIVE, PROMPT], [NEGATIVE, PROMPT])
        dim = (gen.size_embedding_total - pooled.shape[-1]) // 6
        size = size_conditioning(args.size, args.size, dim=dim)
        return context, np.concatenate([pooled, np.repeat(size, 2, 0)], -1).astype(np.float32)

    _, encode_first = _timed(encode, what="encode")
    (context, y), encode_s = _timed(encode, what="encode")
    gen.release_text_encoders()  # as sdxl_minimal_inference does for one-shot generation
    steps = []
    on_step, last = _stop_after(args.run_steps, steps)
    last[0] = time.perf_counter()
    latents = gen.sample(noise, get_scheduler("euler"), args.steps, context, y, 7.0,
                         callback=lambda i, _latents: on_step(i))
    gen.release_unet()  # as sdxl_minimal_inference does before the last decode
    _, decode_first = _timed(gen.decode, latents, what="decode")
    _, decode_s = _timed(gen.decode, latents, what="decode")
    np.save(args.out_array, latents)
    return {"load": load, "encode": encode_s, "encode_first": encode_first, "steps": steps, "decode": decode_s,
            "decode_first": decode_first, "rss": peak_rss_gb(), "phase_peaks": dict(PHASE_PEAKS)}


def summarize(r, steps):
    """Steady s/step (steps after the first), compile overhead, s/image at ``steps`` steps and the first image."""
    times = r["steps"]
    step = sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0]
    overhead = (times[0] - step) + (r["encode_first"] - r["encode"]) + (r["decode_first"] - r["decode"])
    image = r["encode"] + steps * step + r["decode"]
    return dict(r, step=step, image=image, first=image + overhead, ran=len(times))


def run_worker(kind, extra):
    return bench_common.run_worker(__file__, ["--worker", kind] + extra)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="full")
    p.add_argument("--model", default=None, help="diffusers folder (default: a random model in --cache)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "bench_inference"),
                   help="where the random model is written once")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--run_steps", type=int, default=None,
                   help="run only the first K (>= 2) steps of the --steps schedule; s/image counts all --steps")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--pynative", action="store_true", help="MindSpore side in PyNative mode")
    p.add_argument("--sequential_guidance", action="store_true",
                   help="MindSpore side runs the two guidance branches as two batch-1 U-Net calls (half the "
                        "activation memory); torch batches them")
    p.add_argument("--fp16_unet_weights", action="store_true",
                   help="MindSpore side keeps the U-Net weights in fp16 and computes in fp32 (the random model "
                        "is written in fp16, so both sides compute with the same weight values)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--noise", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out_array", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_steps is not None and args.run_steps < 2:
        p.error("--run_steps must be >= 2 (the first step includes the graph compile)")
    args.tokenizers = {}
    if args.worker:
        import library  # noqa: F401  (CPU ISA env before mindspore/torch)
        fn = {"prepare": worker_prepare, "torch": worker_torch, "ms": worker_ms}[args.worker]
        print("RESULT " + json.dumps(fn(args)))
        return

    import numpy as np

    if args.model is None:
        args.model = os.path.join(args.cache, args.config)
        if not os.path.exists(os.path.join(args.model, "model_index.json")):
            print(f"writing a random {args.config} SDXL model to {args.model} ...", flush=True)
            os.makedirs(args.model, exist_ok=True)
            res = run_worker("prepare", ["--config", args.config, "--model", args.model])
            if "error" in res:
                sys.exit(f"prepare failed: {res['error']}")
    work = tempfile.mkdtemp(prefix="bench_inference_")
    noise = os.path.join(work, "noise.npy")
    np.save(noise, np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8))
            .astype(np.float32))
    common = ["--config", args.config, "--model", args.model, "--size", str(args.size), "--steps", str(args.steps),
              "--noise", noise] + (["--run_steps", str(args.run_steps)] if args.run_steps else [])
    results = {}
    mode = "PyNative" if args.pynative else "graph"
    results[f"MindSpore ({mode})"] = run_worker(
        "ms", common + ["--out_array", os.path.join(work, "ms.npy")] + (["--pynative"] if args.pynative else [])
        + (["--fp16_unet_weights"] if args.fp16_unet_weights else [])
        + (["--sequential_guidance"] if args.sequential_guidance else []))
    if not args.skip_torch:
        results["torch diffusers"] = run_worker("torch", common + ["--out_array", os.path.join(work, "torch.npy")])

    ran = min(args.run_steps or args.steps, args.steps)
    print(f"\nSDXL inference, config {args.config}, {args.size}x{args.size}, {args.steps} Euler steps"
          + (f" (s/image from the first {ran} steps run)" if ran < args.steps else "")
          + ", guidance 7, fp32 compute"
          + "".join(f" (MindSpore: {what})" for flag, what in ((args.fp16_unet_weights, "fp16 U-Net weights"),
                    (args.sequential_guidance, "sequential guidance")) if flag)
          + f", CPU ({os.cpu_count()} cores)")
    print(f"{'implementation':<22} {'s/image':>9} {'s/step':>8} {'encode s':>9} {'decode s':>9} "
          f"{'first image':>12} {'load s':>8} {'peak RSS GB':>12}")
    rows = {}
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<22} {r['error']}")
            continue
        rows[name] = x = summarize(r, args.steps)
        print(f"{name:<22} {fmt(x['image'], '.1f'):>9} {fmt(x['step']):>8} {fmt(x['encode']):>9} "
              f"{fmt(x['decode']):>9} {fmt(x['first'], '.1f'):>12} {fmt(x['load'], '.1f'):>8} {fmt(x['rss']):>12}")
    for name, r in rows.items():
        print(f"{name}: peak RSS GB when each part ended: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r.get("phase_peaks", {}).items()))
    ms_r, th_r = rows.get(f"MindSpore ({mode})"), rows.get("torch diffusers")
    if ms_r and th_r:
        print(f"ratio MindSpore / torch: s/image {ms_r['image'] / th_r['image']:.2f}, "
              f"s/step {ms_r['step'] / th_r['step']:.2f}")
        a, b = np.load(os.path.join(work, "ms.npy")), np.load(os.path.join(work, "torch.npy"))
        print(f"latents after {ran} steps: max |MindSpore - torch| = {np.abs(a - b).max():.3g} "
              f"(max |torch| {np.abs(b).max():.3g})")
    print("RESULT " + json.dumps({name: {k: v for k, v in r.items()} for name, r in rows.items()}))

if __name__ == "__main__":
    main()
