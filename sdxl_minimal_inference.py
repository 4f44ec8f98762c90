"""SDXL text-to-image generation with LoRAs merged (kohya's ``sdxl_minimal_inference.py``, MindSpore).

    python sdxl_minimal_inference.py --ckpt_path sd_xl_base_1.0.safetensors \\
        --prompt "a photo of a cat" --lora_weights my_lora.safetensors;0.8 --output_dir out

Text conditioning as SDXL/diffusers: text encoder 1's penultimate hidden state (kohya's
``hidden_states[11]`` of its 12 layers) and text encoder 2's penultimate hidden state, concatenated;
the pooled embedding is text encoder 2's final-layer-normed EOS state through ``text_projection``
(SGM/diffusers orientation, as in training). ``--prompt2`` goes to text encoder 2 with its own
tokenizer (pads with "!"); kohya feeds text encoder 1's tokens there and ignores ``--prompt2``.
Classifier-free guidance with the encoded negative prompt (for both encoders). The U-Net step
(both guidance branches in one batch) runs in graph mode and compiles once per image size.
"""
import argparse
import datetime
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import library  # noqa: E402,F401  (sets the CPU runtime env before mindspore loads)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import (  # noqa: E402
    UserError, add_device_arguments, check_dtype_supported, run_main, setup_device_from_args)
from library.path_utils import check_output_folder, make_output_folder, remove_empty_folders  # noqa: E402
from library.sdxl_pipeline import Generator, save_png  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 1024


def setup_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", type=str, required=True,
                   help="SDXL checkpoint: SAI single file (.safetensors / MindSpore .ckpt) or diffusers folder")
    p.add_argument("--prompt", type=str, default="A photo of a cat",
                   help="what to draw (text encoder 1, and text encoder 2 unless --prompt2 is given)")
    p.add_argument("--prompt2", type=str, default=None,
                   help="prompt for text encoder 2 (default: --prompt)")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="what to steer away from (classifier-free guidance; default: empty)")
    p.add_argument("--output_dir", type=str, default=".",
                   help="folder for the PNGs (created when the first image is written)")
    p.add_argument("--lora_weights", type=str, nargs="*", default=[],
                   help="LoRA files (ours or kohya's torch .safetensors/.ckpt), each 'path;multiplier' "
                        "(multiplier default 1.0); several are merged in order")
    p.add_argument("--interactive", action="store_true",
                   help="read prompt, prompt2, negative prompt and seed from stdin until an empty prompt")
    p.add_argument("--width", type=int, default=DEFAULT_SIZE, help="image width in pixels (multiple of 32 for SDXL)")
    p.add_argument("--height", type=int, default=DEFAULT_SIZE, help="image height in pixels (multiple of 32 for SDXL)")
    p.add_argument("--steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--guidance_scale", type=float, default=7.0,
                   help="classifier-free guidance scale (<= 1: no guidance, negative prompt unused)")
    p.add_argument("--seed", type=int, default=None, help="random seed (image i uses seed + i); random if unset")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--sampler", type=str, default="euler",
                   help="euler (default) or any of kohya's sampler names: euler_a, ddim, pndm, lms, heun, dpm_2, "
                        "dpm_2_a, dpmsolver, dpmsolver++, dpmsingle (also k_euler, k_euler_a, k_lms, k_dpm_2, "
                        "k_dpm_2_a); SDXL's scheduler config")
    p.add_argument("--timestep_spacing", type=str, default="leading", choices=("leading", "linspace", "trailing"),
                   help="sampler timesteps: leading (SDXL's scheduler config, diffusers' SDXL pipeline; default) "
                        "or linspace (what kohya's script gets from diffusers' class defaults) or trailing")
    p.add_argument("--original_size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL size conditioning: original image size (default: --height --width)")
    p.add_argument("--crop", type=int, nargs=2, default=(0, 0), metavar=("TOP", "LEFT"),
                   help="SDXL size conditioning: crop top-left coordinates (default 0 0)")
    p.add_argument("--target_size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL size conditioning: target size (default: --height --width)")
    p.add_argument("--vae", type=str, default=None, help="a separate VAE (file or diffusers folder)")
    p.add_argument("--dtype", type=str, default="fp32",
                   help="U-Net weights/compute dtype: fp32 (default), fp16, bf16 (not on CPU)")
    p.add_argument("--vae_dtype", type=str, default="fp32", help="VAE dtype: fp32 (default) or fp16")
    p.add_argument("--sequential_guidance", action="store_true",
                   help="run the U-Net on the negative and the positive prompt one after the other (batch 1 each) "
                        "instead of as one batch of 2: same images, about half the activation memory (1024x1024 "
                        "in fp32 on a 24 GB CPU machine needs it)")
    p.add_argument("--whole_graph_unet", action="store_true",
                   help="compile the U-Net step as one graph instead of one graph per layer (the default, whose "
                        "graphs give their memory back as they end and whose transformer blocks share one "
                        "compiled graph): more memory and a longer compile")
    p.add_argument("--fp16_unet_weights", action="store_true",
                   help="with --dtype fp32: keep the U-Net weights in fp16 (half their memory; an fp16 checkpoint "
                        "loses nothing) and compute in fp32, each layer casting its weight as it runs")
    p.add_argument("--init_latents", type=str, default=None,
                   help=".npy of initial noise, (4, H/8, W/8) or (N, 4, H/8, W/8) with N >= --num_images, "
                        "used instead of seeded noise (scaled by the sampler's init_noise_sigma), for "
                        "reproducing another implementation's run")
    p.add_argument("--save_latents", action="store_true",
                   help="also write <image>.npz with the final latents and the decoded float pixels")
    add_device_arguments(p)
    return p


# ---------------------------------------------------------------------------
# argument checks (before any model is loaded)


def parse_lora_spec(spec):
    """'path;multiplier' -> (path, multiplier); the multiplier defaults to 1.0."""
    path, sep, mult = spec.rpartition(";")
    if not sep:
        path, mult = spec, "1.0"
    try:
        multiplier = float(mult)
    except ValueError:
        raise UserError(f"--lora_weights '{spec}': multiplier '{mult}' is not a number (use path;multiplier)") \
            from None
    if not os.path.isfile(path):
        raise UserError(f"{path}: LoRA file not found")
    return path, multiplier


def check_args(args):
    for name in ("width", "height"):
        v = getattr(args, name)
        if v <= 0 or v % 8:
            raise UserError(f"--{name} {v} must be a positive multiple of 8 (SDXL needs a multiple of 32)")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps} must be at least 1")
    if args.num_images < 1:
        raise UserError(f"--num_images {args.num_images} must be at least 1")
    for name in ("original_size", "target_size"):
        v = getattr(args, name)
        if v is not None and min(v) <= 0:
            raise UserError(f"--{name} {v[0]} {v[1]} must be positive")
    if min(args.crop) < 0:
        raise UserError(f"--crop {args.crop[0]} {args.crop[1]} must not be negative")
    from library.sdxl_schedulers import get_scheduler

    get_scheduler(args.sampler)  # unknown sampler: clear error now
    if not os.path.exists(args.ckpt_path):
        raise UserError(f"{args.ckpt_path}: checkpoint not found")
    if args.vae is not None and not os.path.exists(args.vae):
        raise UserError(f"{args.vae}: VAE not found")
    loras = [parse_lora_spec(s) for s in args.lora_weights]
    if args.init_latents is not None and not os.path.isfile(args.init_latents):
        raise UserError(f"{args.init_latents}: initial latents file not found")
    # checked now, created when the first image is written: a failed run leaves no empty folder behind
    check_output_folder(args.output_dir, "--output_dir")
    return loras


# ---------------------------------------------------------------------------
# models


def load_models(ckpt_path, vae_path=None, dtype_name="fp32", vae_dtype_name="fp32"):
    """(te1, te2, vae, unet): the U-Net is read straight into ``dtype_name`` (half the memory in fp16), the VAE
    into ``vae_dtype_name`` (read a second time when the two differ), text encoders in fp32."""
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint, load_vae

    dtype = None if dtype_name == "fp32" else dtype_name
    vae_dtype = None if vae_dtype_name == "fp32" else vae_dtype_name
    te1, te2, vae, unet, _, _ = load_models_from_sdxl_checkpoint(ckpt_path, dtype=dtype, vae_path=vae_path)
    if vae_dtype != dtype:
        del vae
        vae = load_vae(vae_path or ckpt_path, dtype=vae_dtype)
    return te1, te2, vae, unet


def merge_loras(loras, te1, te2, vae, unet):
    """Merge each (path, multiplier) into the fp32 weights, in order (LoRA or LoHa: the file's keys say which
    network module reads it)."""
    from networks.network_base import create_network_from_weights_file as create_network_from_weights

    for path, multiplier in loras:
        logger.info("merging LoRA %s (multiplier %s)", path, multiplier)
        network, weights_sd = create_network_from_weights(multiplier, path, vae, [te1, te2], unet,
                                                          for_inference=True)
        network.merge_to([te1, te2], unet, weights_sd)


# ---------------------------------------------------------------------------
# generation


def load_init_latents(path, num_images, shape):
    import numpy as np

    try:
        arr = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read initial latents ({e})") from None
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(shape) or arr.shape[0] < num_images:
        raise UserError(f"{path}: initial latents have shape {tuple(arr.shape)}; need ({num_images}, "
                        f"{', '.join(map(str, shape))}) for this size and --num_images")
    return arr.astype(np.float32)


def generate_images(gen, args, prompt, prompt2, negative_prompt, seed, model_name, lora_desc, init_latents=None):
    import numpy as np
    from tqdm import tqdm

    from library.sdxl_schedulers import get_scheduler

    prompt2 = prompt if prompt2 is None else prompt2
    context, y = gen.conditioning(prompt, prompt2, negative_prompt, args.guidance_scale, args.width, args.height,
                                  args.original_size, args.crop, args.target_size)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 31))
    shape = gen.latent_shape(args.width, args.height)
    timestamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = []
    for i in tqdm(range(args.num_images), desc="images", unit="image", dynamic_ncols=True):
        image_seed = seed + i
        rng = np.random.default_rng(image_seed)
        noise = init_latents[i:i + 1] if init_latents is not None else \
            rng.standard_normal((1,) + shape, dtype=np.float32)
        scheduler = get_scheduler(args.sampler, timestep_spacing=args.timestep_spacing)
        latents = gen.sample(noise, scheduler, args.steps, context, y, args.guidance_scale, rng)
        if gen.one_shot and i == args.num_images - 1:
            gen.release_unet()
        pixels = gen.decode(latents)
        info = {"prompt": prompt, "prompt2": prompt2, "negative_prompt": negative_prompt,
                "seed": image_seed if init_latents is None else f"{image_seed} (initial latents from "
                                                                 f"{os.path.basename(args.init_latents)})",
                "steps": args.steps, "scale": args.guidance_scale, "sampler": args.sampler,
                "timestep_spacing": args.timestep_spacing,
                "width": args.width, "height": args.height,
                "original_size": " ".join(map(str, args.original_size or (args.height, args.width))),
                "crop": " ".join(map(str, args.crop)),
                "target_size": " ".join(map(str, args.target_size or (args.height, args.width))),
                "model": model_name, "vae": os.path.basename(os.path.normpath(args.vae)) if args.vae else "from model",
                "loras": lora_desc, "dtype": args.dtype, "vae_dtype": args.vae_dtype}
        created = make_output_folder(args.output_dir, "--output_dir")
        try:
            path = save_png(args.output_dir, f"image_{timestamp}_{i:03d}", pixels, info)
        except BaseException:
            remove_empty_folders(created)
            raise
        if args.save_latents:
            np.savez(os.path.splitext(path)[0] + ".npz", latents=latents, pixels=pixels)
        tqdm.write(path, file=sys.stdout)  # the saved image's path; between the progress bars, not through them
        paths.append(path)
    return paths


def interactive_loop(generate):
    """kohya's loop: prompt (empty ends), prompt2 (empty: the prompt), negative prompt, seed (empty: random)."""
    while True:
        try:
            prompt = input("prompt: ")
            if prompt == "":
                break
            prompt2 = input("prompt2: ") or prompt
            negative_prompt = input("negative prompt: ")
            seed_text = input("seed: ").strip()
        except EOFError:
            break
        try:
            seed = int(seed_text) if seed_text else None
        except ValueError:
            print(f"seed '{seed_text}' is not an integer; try again", file=sys.stderr)
            continue
        generate(prompt, prompt2, negative_prompt, seed)


def main(argv=None):
    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loras = check_args(args)
    target = setup_device_from_args(args)
    dtype_name = check_dtype_supported(args.dtype, target)
    vae_dtype_name = check_dtype_supported(args.vae_dtype, target)

    if args.fp16_unet_weights and dtype_name != "fp32":
        raise UserError(f"--fp16_unet_weights is for --dtype fp32 (with {dtype_name} the U-Net weights are "
                        f"half precision already)")
    load_dtype = "fp16" if args.fp16_unet_weights else dtype_name  # the Generator still computes in dtype_name
    te1, te2, vae, unet = load_models(args.ckpt_path, args.vae, load_dtype, vae_dtype_name)
    merge_loras(loras, te1, te2, vae, unet)
    gen = Generator(te1, te2, vae, unet, dtype_name, vae_dtype_name, sequential_guidance=args.sequential_guidance,
                    one_shot=not args.interactive, segmented=not args.whole_graph_unet)
    del te1, te2, vae, unet  # the Generator's references are the last ones: one-shot runs release them
    gen.check_size(args.width, args.height)
    init_latents = None
    if args.init_latents is not None:
        init_latents = load_init_latents(args.init_latents, args.num_images, gen.latent_shape(args.width, args.height))

    model_name = os.path.basename(os.path.normpath(args.ckpt_path))
    lora_desc = ", ".join(f"{os.path.basename(p)}:{m:g}" for p, m in loras) or "none"

    def generate(prompt, prompt2, negative_prompt, seed):
        return generate_images(gen, args, prompt, prompt2, negative_prompt, seed, model_name, lora_desc,
                               init_latents)

    if args.interactive:
        interactive_loop(generate)
    else:
        generate(args.prompt, args.prompt2, args.negative_prompt, args.seed)


if __name__ == "__main__":
    run_main(main)
