"""End-to-end smoke run of the SDXL model stack on a tiny, randomly initialised
SDXL-topology model: prompt -> both CLIP tokenizers -> both text encoders ->
UNet (Euler sampling) -> VAE decode -> PNG.

The weights are random, so the image is noise; the run shows that every part
(offline tokenizers, text encoders, UNet, VAE) builds and runs on this machine
in the chosen mode, and how long compiling and running take.

    python tools/tiny_sdxl_demo.py --prompt "a photo of a cat" --steps 4
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (sets the CPU runtime env before mindspore loads)
from library import dtypes  # noqa: E402
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import (  # noqa: E402
    UserError, add_device_arguments, check_dtype_supported, run_main, setup_device_from_args)

# DDPM schedule of SDXL: scaled_linear betas 0.00085..0.012 over 1000 steps
BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS = 0.00085, 0.012, 1000


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--prompt", default="a photo of a cat")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="image size in pixels (multiple of 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", help="fp32 or fp16 (bf16 on Ascend only)")
    p.add_argument("--output", default="output/tiny_sdxl_demo.png")
    add_device_arguments(p)
    return p.parse_args(argv)


def euler_sigmas(steps):
    import numpy as np

    betas = np.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    all_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    timesteps = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps)[::-1]
    sigmas = np.interp(timesteps, np.arange(NUM_TRAIN_TIMESTEPS), all_sigmas)
    return timesteps, np.append(sigmas, 0.0)


def main(argv=None):
    args = parse_args(argv)
    if args.size % 32 or args.size <= 0:  # 8x VAE downscale, then two 2x UNet downsamples
        raise UserError(f"--size {args.size} is not a positive multiple of 32")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps} must be at least 1")
    target = setup_device_from_args(args)
    dtype_name = check_dtype_supported(args.dtype, target)

    import numpy as np
    import mindspore as ms
    from mindspore import Tensor
    from PIL import Image

    from library import layers
    from library.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, VAEDecode
    from library.clip_text_model import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from library.clip_tokenizer import load_tokenizers
    from library.sdxl_original_unet import SdxlUNet2DConditionModel, get_size_embeddings

    layers.set_init_seed(args.seed)
    te1_cfg = CLIPTextConfig.tiny(vocab_size=49408)
    te2_cfg = CLIPTextConfig.tiny2(vocab_size=49408, bos_token_id=49406, eos_token_id=49407)
    text_encoder1 = CLIPTextModel(te1_cfg, hidden_state_indices=[-2])
    text_encoder2 = CLIPTextModelWithProjection(te2_cfg, hidden_state_indices=[-2])
    context_dim = te1_cfg.hidden_size + te2_cfg.hidden_size
    adm = te2_cfg.projection_dim + 6 * 256
    unet = SdxlUNet2DConditionModel(model_channels=32, transformer_depth=(0, 1, 1), num_head_channels=8,
                                    context_dim=context_dim, adm_in_channels=adm, norm_num_groups=8)
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(block_out_channels=(16, 32, 32, 32)))  # 8x, as SDXL
    ms_dtype = dtypes.ms_dtype(dtype_name)
    if ms_dtype != ms.float32:
        unet.to_dtype(ms_dtype)
    for cell in (text_encoder1, text_encoder2, unet, vae):
        cell.set_train(False)

    tokenizer1, tokenizer2 = load_tokenizers()
    ids1 = Tensor(np.asarray(tokenizer1(args.prompt, padding="max_length", max_length=77,
                                        truncation=True)["input_ids"], np.int32).reshape(1, 77))
    ids2 = Tensor(np.asarray(tokenizer2(args.prompt, padding="max_length", max_length=77,
                                        truncation=True)["input_ids"], np.int32).reshape(1, 77))

    t0 = time.perf_counter()
    _, _, hidden1 = text_encoder1(ids1)
    _, _, pooled2, hidden2 = text_encoder2(ids2)
    context = ms.ops.concat((hidden1[0], hidden2[0]), -1).astype(ms_dtype)
    latent = args.size // 8
    size = np.array([[args.size, args.size]], np.float32)
    y = np.concatenate([pooled2.asnumpy(), get_size_embeddings(size, np.zeros_like(size), size)], -1)
    y = Tensor(y.astype(np.float32)).astype(ms_dtype)
    t_text = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed)
    timesteps, sigmas = euler_sigmas(args.steps)
    x = rng.standard_normal((1, 4, latent, latent)) * np.sqrt(sigmas[0] ** 2 + 1)  # Euler's init scale
    times = []
    for i, t in enumerate(timesteps):
        t0 = time.perf_counter()
        c_in = 1.0 / np.sqrt(sigmas[i] ** 2 + 1)
        eps = unet(Tensor((x * c_in).astype(np.float32)).astype(ms_dtype),
                   Tensor(np.array([t], np.float32)), context, y).astype(ms.float32).asnumpy()
        x = x + eps * (sigmas[i + 1] - sigmas[i])
        times.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    image = VAEDecode(vae)(Tensor((x / vae.scaling_factor).astype(np.float32))).asnumpy()[0]
    t_vae = time.perf_counter() - t0
    image = ((np.clip(image, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)

    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.output + ".tmp.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, args.output)
    mode = "PyNative" if args.pynative else "graph"
    print(f"device {target}, {mode} mode, {dtype_name}: text encoders {t_text:.2f} s, "
          f"UNet first step {times[0]:.2f} s (includes compile), later steps "
          f"{(sum(times[1:]) / max(len(times) - 1, 1)):.3f} s, VAE decode {t_vae:.2f} s")
    print(f"wrote {args.output} ({args.size}x{args.size})")


if __name__ == "__main__":
    run_main(main)
