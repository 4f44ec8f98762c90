"""Build the offline LoRA-training demo: a tiny SDXL-topology SAI checkpoint (random
weights), a small generated PNG dataset (coloured shapes with captions) and the
dataset/argument .toml files, in a work folder.

    python tools/make_tiny_train_demo.py && python sdxl_train_network.py --config_file output/train_demo/train.toml

The checkpoint has SDXL's layout and widths that are multiples of SDXL's head
width (64) and GroupNorm groups (32), so it loads with the trainer's defaults:
text encoders with the real 49408-token CLIP vocabulary (hidden 64 and 128),
UNet channels 64/128/256, ``context_dim`` = 64 + 128, ``adm_in_channels`` =
text encoder 2's projection (64) + 6*256, an 8x VAE.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import library  # noqa: E402,F401  (sets the CPU runtime env before mindspore loads)
from library.arg_utils import ArgumentParser  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square")


def build_tiny_models(seed=0, small=False):
    """The demo's models; ``small``: 2 UNet levels with one ResBlock each (faster to compile, for tests)."""
    from library import layers
    from library.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from library.clip_text_model import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from library.sdxl_original_unet import SdxlUNet2DConditionModel

    layers.set_init_seed(seed)
    te1_cfg = CLIPTextConfig.sdxl_text_encoder1(hidden_size=64, intermediate_size=128, projection_dim=64,
                                                num_hidden_layers=3, num_attention_heads=1)
    te2_cfg = CLIPTextConfig.sdxl_text_encoder2(hidden_size=128, intermediate_size=256, projection_dim=64,
                                                num_hidden_layers=3, num_attention_heads=2)
    te1 = CLIPTextModel(te1_cfg)
    te2 = CLIPTextModelWithProjection(te2_cfg)
    levels = dict(channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1)) if small else \
        dict(transformer_depth=(0, 1, 1))
    unet = SdxlUNet2DConditionModel(model_channels=64, num_head_channels=64, **levels,
                                    context_dim=te1_cfg.hidden_size + te2_cfg.hidden_size,
                                    adm_in_channels=te2_cfg.projection_dim + 6 * 256, norm_num_groups=32)
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(block_out_channels=(32, 32, 64, 64), norm_num_groups=32))
    return te1, te2, unet, vae


def write_checkpoint(path, seed=0, small=False):
    from library.sdxl_model_util import save_stable_diffusion_checkpoint

    te1, te2, unet, vae = build_tiny_models(seed, small)
    tmp = path + ".tmp.safetensors"
    save_stable_diffusion_checkpoint(tmp, te1, te2, unet, 0, 0, None, vae, None, {"demo": "tiny random SDXL"})
    os.replace(tmp, path)


def draw_image(colour, shape, size, rng):
    from PIL import Image, ImageDraw

    w, h = size
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.25, 0.4))
    cx, cy = int(w / 2 + rng.integers(-w // 8, w // 8 + 1)), int(h / 2 + rng.integers(-h // 8, h // 8 + 1))
    box = [cx - r, cy - r, cx + r, cy + r]
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return img


def write_images(folder, n, sizes, seed=0, captions=True):
    """``n`` PNGs of coloured shapes (sizes cycled) with ``.txt`` captions; returns the file names."""
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        name = f"{i:03d}_{colour}_{shape}"
        draw_image(colour, shape, sizes[i % len(sizes)], rng).save(os.path.join(folder, name + ".png"))
        if captions:
            with open(os.path.join(folder, name + ".txt"), "w", encoding="utf-8") as f:
                f.write(f"a {colour} {shape}, simple shape on a plain background")
        names.append(name)
    return names


DATASET_TOML = """[general]
enable_bucket = false
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{image_dir}'
  num_repeats = 1
"""

TRAIN_TOML = """[model_arguments]
pretrained_model_name_or_path = '{ckpt}'

[dataset_arguments]
dataset_config = '{dataset}'
cache_latents = true
max_data_loader_n_workers = 0

[training_arguments]
output_dir = '{out}'
output_name = 'tiny_lora'
max_train_steps = {steps}
seed = 42
save_every_n_steps = {save_every}
save_model_as = 'safetensors'

[sample_prompt_arguments]
sample_prompts = '{prompts}'
sample_at_first = true
sample_every_n_steps = {steps}
sample_sampler = 'euler_a'

[network_arguments]
network_module = 'networks.lora'
network_dim = 8
network_alpha = 8
network_train_unet_only = true
network_args = ['conv_dim=8', 'conv_alpha=8']

[optimizer_arguments]
optimizer_type = 'AdamW'
learning_rate = 1e-2
lr_scheduler = 'cosine'
lr_warmup_steps = 4
max_grad_norm = 1.0
"""


def write_dataset(folder, n, resolution=64, batch_size=1, seed=0, subset="caption_extension = '.txt'"):
    """``n`` images (``write_images``, square ``resolution``, captions written) in ``folder/img`` and a
    one-subset ``folder/dataset.toml`` (``subset``: the subset's extra toml line); returns both paths."""
    images = os.path.join(folder, "img")
    write_images(images, n, [(resolution, resolution)], seed=seed, captions=True)
    toml_path = os.path.join(folder, "dataset.toml")
    with open(toml_path, "w", encoding="utf-8") as f:
        f.write(f"[[datasets]]\nresolution = {resolution}\nbatch_size = {batch_size}\n[[datasets.subsets]]\n"
                f"image_dir = '{images}'\n{subset}\n")
    return images, toml_path


# kohya's prompt-file options: --w/--h size, --s steps, --d seed, --l guidance scale
SAMPLE_PROMPTS = "a red circle, simple shape on a plain background --w 64 --h 64 --s 12 --d 1 --l 4\n"


def make_demo(work, steps=40, seed=0, small=False):
    """Write the demo files under ``work``; returns the train .toml path. ``small``: the 2-level
    test topology (the pipeline is the same, it compiles faster)."""
    work = os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, "tiny_sdxl.safetensors")
    if not os.path.exists(ckpt):
        write_checkpoint(ckpt, seed, small)
    image_dir = os.path.join(work, "images")
    write_images(image_dir, 8, [(64, 64)], seed)
    dataset = os.path.join(work, "dataset.toml")
    with open(dataset, "w", encoding="utf-8") as f:
        f.write(DATASET_TOML.format(image_dir=image_dir))
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write(SAMPLE_PROMPTS)
    train = os.path.join(work, "train.toml")
    with open(train, "w", encoding="utf-8") as f:
        f.write(TRAIN_TOML.format(ckpt=ckpt, dataset=dataset, out=os.path.join(work, "lora"), steps=steps,
                                  save_every=max(1, steps // 2), prompts=prompts))
    return train


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--work_dir", default="output/train_demo")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    import mindspore as ms

    ms.set_device("CPU")
    train = make_demo(args.work_dir, args.steps, args.seed)
    print(f"wrote the demo files; train with: python sdxl_train_network.py --config_file {train}")


if __name__ == "__main__":
    run_main(main)
