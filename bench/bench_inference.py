"""SDXL text-to-image seconds per image: sdxl_minimal_inference (MindSpore, graph mode) beside torch
diffusers' StableDiffusionXLPipeline, same weights, prompt, Euler sampler, steps, size and initial noise.

    python bench/bench_inference.py                          # full SDXL, 1024x1024, 30 steps (~17 GB RAM)
    python bench/bench_inference.py --config tiny --size 256 --steps 4    # smoke run, seconds

Without ``--model`` a random-weight model of the chosen configuration is written once as a diffusers
folder (``--cache``, fp16 on disk for ``full``, about 7 GB); with ``--model`` a diffusers folder is used
(both sides need one: diffusers cannot read an SAI single file offline). Each side runs in its own
process (peak RSS is that side's alone): load, one image (includes graph compilation), then
``--images`` timed images. Guidance 7 (both CFG branches in one U-Net batch on both sides), fp32.
The table gives the steady s/image, the first-image time, the load time, peak RSS and the ratio, and
the max difference of the final latents (the same initial noise on both sides).

Do not run the full configuration on a shared machine: it needs ~17 GB of RAM per process and minutes
per image on CPU.
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

    def one():
        with torch.no_grad():
            return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=args.size, width=args.size,
                        num_inference_steps=args.steps, guidance_scale=7.0, latents=noise.clone(),
                        output_type="latent").images

    def one_decoded():
        latents = one()
        with torch.no_grad():
            pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
        return latents

    t0 = time.perf_counter()
    latents = one_decoded()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.images):
        one_decoded()
    steady = (time.perf_counter() - t0) / args.images
    np.save(args.out_array, latents.numpy())
    return {"load": load, "first": first, "steady": steady, "rss": peak_rss_gb()}


def worker_ms(args):
    import numpy as np

    import sdxl_minimal_inference as smi
    from library.device_utils import setup_device
    from library.sdxl_schedulers import get_scheduler

    setup_device("CPU", pynative=args.pynative)
    t0 = time.perf_counter()
    te1, te2, vae, unet = smi.load_models(args.model)
    gen = smi.Generator(te1, te2, vae, unet)
    gen.check_size(args.size, args.size)
    load = time.perf_counter() - t0
    noise = np.load(args.noise)
    ns = argparse.Namespace(original_size=None, target_size=None, crop=(0, 0))

    def one():
        context, pooled = gen.encode([NEGATIVE, PROMPT], [NEGATIVE, PROMPT])
        dim = (unet.adm_in_channels - pooled.shape[-1]) // 6
        size = smi.size_conditioning(ns, args.size, args.size, dim)
        y = np.concatenate([pooled, np.repeat(size, 2, 0)], -1).astype(np.float32)
        latents = gen.sample(noise, get_scheduler("euler"), args.steps, context, y, 7.0)
        gen.decode(latents)
        return latents

    t0 = time.perf_counter()
    latents = one()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.images):
        one()
    steady = (time.perf_counter() - t0) / args.images
    np.save(args.out_array, latents)
    return {"load": load, "first": first, "steady": steady, "rss": peak_rss_gb()}


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
    p.add_argument("--images", type=int, default=1, help="timed images after the first")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--pynative", action="store_true", help="MindSpore side in PyNative mode")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--noise", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out_array", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
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
              "--images", str(args.images), "--noise", noise]
    results = {}
    mode = "PyNative" if args.pynative else "graph"
    results[f"MindSpore ({mode})"] = run_worker(
        "ms", common + ["--out_array", os.path.join(work, "ms.npy")] + (["--pynative"] if args.pynative else []))
    if not args.skip_torch:
        results["torch diffusers"] = run_worker("torch", common + ["--out_array", os.path.join(work, "torch.npy")])

    print(f"\nSDXL inference, config {args.config}, {args.size}x{args.size}, {args.steps} Euler steps, guidance 7, "
          f"fp32, CPU ({os.cpu_count()} cores)")
    print(f"{'implementation':<22} {'s/image':>9} {'first image':>12} {'load s':>8} {'peak RSS GB':>12}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<22} {r['error']}")
            continue
        print(f"{name:<22} {fmt(r['steady']):>9} {fmt(r['first']):>12} {fmt(r['load']):>8} {fmt(r['rss']):>12}")
    ms_r, th_r = results.get(f"MindSpore ({mode})", {}), results.get("torch diffusers", {})
    if "steady" in ms_r and "steady" in th_r:
        print(f"ratio MindSpore / torch (s/image): {ms_r['steady'] / th_r['steady']:.2f}")
        a, b = np.load(os.path.join(work, "ms.npy")), np.load(os.path.join(work, "torch.npy"))
        print(f"final latents max |MindSpore - torch| = {np.abs(a - b).max():.3g} (max |torch| {np.abs(b).max():.3g})")


if __name__ == "__main__":
    main()
