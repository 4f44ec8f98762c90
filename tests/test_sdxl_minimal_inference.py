"""sdxl_minimal_inference.py against torch diffusers' StableDiffusionXLPipeline on a tiny SDXL-topology
checkpoint (same weights, prompts, Euler sampler, steps and initial latents), with and without LoRAs;
plus its one-line errors, PNG names/metadata and the scheduler against diffusers'.

The tiny model has SDXL's topology and head width (64) so the checkpoint loads with the defaults the
script uses; both text encoders have CLIP's 49408-token vocabulary so the real tokenizers work.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, assert_close  # noqa: E402  (imports library before mindspore)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

import sdxl_minimal_inference as smi  # noqa: E402
from library.device_utils import UserError  # noqa: E402
from library.sdxl_schedulers import get_scheduler  # noqa: E402
from sdxl_checkpoint_helpers import randomize, te2_to_sai, unet_kwargs, unet_to_sai, vae_to_sai  # noqa: E402

VOCAB = 49408
HEAD = 64
TE1 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
           max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64, bos_token_id=49406,
           eos_token_id=2, pad_token_id=1)
TE2 = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
           max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
           eos_token_id=49407, pad_token_id=0)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           latent_channels=4, norm_num_groups=32, scaling_factor=0.13025)
SIZE = 64
STEPS = 4
PROMPT, PROMPT2, NEGATIVE = "a photo of a cat", "oil painting, warm light", "blurry, low quality"


def _torch_models():
    unet = diffusers.UNet2DConditionModel(**unet_kwargs(mc=64, depth=(0, 1, 1), head_dim=HEAD,
                                                       pooled=TE2["projection_dim"], time_dim=8,
                                                       context_dim=TE1["hidden_size"] + TE2["hidden_size"]))
    vae = diffusers.AutoencoderKL(**VAE)
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TE1, attn_implementation="eager"))
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TE2, attn_implementation="eager"))
    for i, m in enumerate((unet, vae, te1, te2)):
        randomize(m, 10 + i)
        m.eval()
    with torch.no_grad():  # keep activations tame over 4 denoising steps
        unet.conv_out.weight.mul_(0.3)
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2)


def _save_sai(models, path):
    from safetensors.torch import save_file

    sd = {}
    sd.update(unet_to_sai(models["unet"].state_dict()))
    sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in models["text_encoder"].state_dict().items()})
    sd.update(te2_to_sai(models["text_encoder_2"].state_dict()))
    sd.update(vae_to_sai(models["vae"].state_dict(), levels=4))
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, path)


def _kohya_lora(models, seed, rank=4):
    """A LoRA in kohya's format by kohya's naming rule on the torch models' names (independent of our code):
    U-Net transformer Linears and ResBlock 3x3 convs (SGM names), text encoders' attention/MLP Linears."""
    gen = torch.Generator().manual_seed(seed)
    sgm = {k[len("model.diffusion_model."):]: v for k, v in unet_to_sai(models["unet"].state_dict()).items()}
    shapes = {}
    for key, value in sgm.items():
        if not key.endswith(".weight") or value.ndim not in (2, 4):
            continue
        path = key[:-len(".weight")]
        if ".transformer_blocks." in path or path.endswith((".proj_in", ".proj_out")) or path.endswith("in_layers.2"):
            shapes["lora_unet_" + path.replace(".", "_")] = tuple(value.shape)
    for prefix, m in (("lora_te1_", models["text_encoder"]), ("lora_te2_", models["text_encoder_2"])):
        for key, value in m.state_dict().items():
            if key.endswith(".weight") and (".self_attn." in key or ".mlp." in key):
                shapes[prefix + key[:-len(".weight")].replace(".", "_")] = tuple(value.shape)
    sd = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            down, up = (rank, shape[1]), (shape[0], rank)
        else:
            down, up = (rank,) + shape[1:], (shape[0], rank, 1, 1)
        sd[name + ".lora_down.weight"] = 0.2 * torch.randn(down, generator=gen)
        sd[name + ".lora_up.weight"] = 0.2 * torch.randn(up, generator=gen)
        sd[name + ".alpha"] = torch.tensor(rank / 2.0)
    return sd


def _checkpoint_and_loras(d, ckpt_name, lora_seeds_ranks):
    """Writes the tiny torch models (torch seed 0) as the SAI checkpoint ``d / ckpt_name`` and a kohya LoRA
    ``d / lora{i}.safetensors`` per (seed, rank); returns (models, checkpoint path, LoRA paths)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    models = _torch_models()
    ckpt = str(d / ckpt_name)
    _save_sai(models, ckpt)
    loras = []
    for i, (seed, rank) in enumerate(lora_seeds_ranks):
        path = str(d / f"lora{i}.safetensors")
        save_file(_kohya_lora(models, seed, rank), path, {"ss_network_module": "networks.lora"})
        loras.append(path)
    return models, ckpt, loras


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from library.clip_tokenizer import write_hf_tokenizer_files

    d = tmp_path_factory.mktemp("sdxl_inference")
    models, ckpt, loras = _checkpoint_and_loras(d, "tiny_sdxl.safetensors", ((1, 4), (2, 4)))
    write_hf_tokenizer_files(str(d / "tok1"))
    write_hf_tokenizer_files(str(d / "tok2"), pad_token="!")
    # the second LoRA also as a MindSpore .ckpt (our format), same tensors
    from library.lora_file import load_state_dict_file, save_state_dict_file
    tensors, meta, dtypes = load_state_dict_file(loras[1])
    ckpt_lora = str(d / "lora1_ms.ckpt")
    save_state_dict_file(ckpt_lora, tensors, meta, dtypes)
    noise = np.random.default_rng(5).standard_normal((2, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    np.save(str(d / "noise.npy"), noise)
    return dict(dir=d, models=models, ckpt=ckpt, loras=loras, ckpt_lora=ckpt_lora, noise=noise)


def _pipeline(setup, loras=()):
    models = setup["models"]
    sched = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                             beta_schedule="scaled_linear", timestep_spacing="leading",
                                             steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=models["vae"], text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"],
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(setup["dir"] / "tok1")),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(setup["dir"] / "tok2")),
        unet=models["unet"], scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    if loras:
        names = []
        for i, (path, _) in enumerate(loras):
            pipe.load_lora_weights(path, adapter_name=f"l{i}")
            names.append(f"l{i}")
        pipe.set_adapters(names, adapter_weights=[m for _, m in loras])
    return pipe


def _reference(setup, loras=(), row=0):
    pipe = _pipeline(setup, loras)
    kw = dict(prompt=PROMPT, prompt_2=PROMPT2, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
              num_inference_steps=STEPS, guidance_scale=7.0)
    with torch.no_grad():
        latents = pipe(latents=torch.from_numpy(setup["noise"][row:row + 1]), output_type="latent", **kw).images
        # the pipeline's own decode path for output_type="np" (fp32 VAE, no latents_mean/std)
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        pixels = pipe.image_processor.postprocess(image, output_type="np")[0]
        latents = latents.numpy()
    if loras:
        pipe.unload_lora_weights()
    return latents, pixels


def _ours(setup, out, loras=(), extra=(), ours_loras=None):
    argv = ["--ckpt_path", setup["ckpt"], "--prompt", PROMPT, "--prompt2", PROMPT2, "--negative_prompt", NEGATIVE,
            "--width", str(SIZE), "--height", str(SIZE), "--steps", str(STEPS), "--guidance_scale", "7",
            "--init_latents", str(setup["dir"] / "noise.npy"), "--save_latents", "--output_dir", str(out),
            "--device_target", "CPU"]
    if loras:
        argv += ["--lora_weights"] + [f"{p};{m}" for p, m in (ours_loras or loras)]
    smi.main(argv + list(extra))
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    results = []
    for png in pngs:
        data = np.load(os.path.join(out, png[:-4] + ".npz"))
        results.append((data["latents"], data["pixels"], os.path.join(out, png)))
    return results


def _compare(setup, tmp_path, loras, num_images=1, ours_loras=None):
    ours = _ours(setup, tmp_path / "out", loras, ["--num_images", str(num_images)], ours_loras)
    assert len(ours) == num_images
    for row, (latents, pixels, png) in enumerate(ours):
        ref_latents, ref_pixels = _reference(setup, loras, row)
        err_l = assert_close(latents, ref_latents, what="final latents")
        err_p = np.abs(pixels - ref_pixels).max()
        print(f"loras={len(loras)} image {row}: latents max abs err {err_l:.3g} "
              f"(max |ref| {np.abs(ref_latents).max():.3g}), pixels max abs err {err_p:.3g}")
        assert err_p <= 1e-3, f"decoded pixels: max abs error {err_p:.3g}"
        assert np.abs(ref_pixels - 0.5).max() > 0.05  # not a flat image
        if row == 0:
            first = (ref_latents, png)
    return first


def test_matches_diffusers_pipeline(setup, tmp_path):
    ref_latents, png = _compare(setup, tmp_path, (), num_images=2)
    name = os.path.basename(png)
    assert re.fullmatch(r"image_\d{8}-\d{6}_000\.png", name), name
    assert os.path.exists(png.replace("_000.png", "_001.png"))
    from PIL import Image
    info = Image.open(png).text
    assert info["prompt"] == PROMPT and info["prompt2"] == PROMPT2 and info["negative_prompt"] == NEGATIVE
    assert info["steps"] == str(STEPS) and info["scale"] == "7.0" and info["sampler"] == "euler"
    assert info["model"] == "tiny_sdxl.safetensors" and info["loras"] == "none"
    setup["base_latents"] = ref_latents


def test_matches_diffusers_pipeline_with_two_loras(setup, tmp_path):
    """A torch-written kohya .safetensors and the second LoRA as our MindSpore .ckpt; diffusers loads both
    as .safetensors with load_lora_weights."""
    loras = [(setup["loras"][0], 0.8), (setup["loras"][1], -0.5)]
    ref_latents, png = _compare(setup, tmp_path, loras, ours_loras=[loras[0], (setup["ckpt_lora"], -0.5)])
    if "base_latents" in setup:  # the LoRAs change the result (the comparison is not vacuous)
        assert np.abs(ref_latents - setup["base_latents"]).max() > 1e-2
    from PIL import Image
    assert Image.open(png).text["loras"] == "lora0.safetensors:0.8, lora1_ms.ckpt:-0.5"


def test_seeds_unguided_and_interactive(setup, tmp_path, monkeypatch, capsys):
    """Seeded noise (image i uses seed + i, recorded in the PNG), same seed -> same image, guidance <= 1
    runs the U-Net on the prompt alone; the interactive loop reads prompt/prompt2/negative/seed. Progress bars
    per image and per denoising step; the output folder is made when the first image is written; files get
    0666 minus the umask."""
    import mindspore as ms
    from PIL import Image

    ms.set_context(mode=ms.PYNATIVE_MODE)  # tiny model: no graph compilation for this bookkeeping test
    try:
        te1, te2, vae, unet = smi.load_models(setup["ckpt"])
        gen = smi.Generator(te1, te2, vae, unet)
        args = smi.setup_parser().parse_args(["--ckpt_path", setup["ckpt"], "--width", "64", "--height", "64",
                                              "--steps", "1", "--num_images", "2", "--output_dir",
                                              str(tmp_path / "a"), "--save_latents"])
        os.makedirs(args.output_dir)
        p1 = smi.generate_images(gen, args, "a cat", None, "", 7, "m", "none")
        assert [Image.open(p).text["seed"] for p in p1] == ["7", "8"]
        args.output_dir = str(tmp_path / "b" / "c")  # made on the first write
        old_umask = os.umask(0o022)
        try:
            p2 = smi.generate_images(gen, args, "a cat", None, "", 7, "m", "none")
        finally:
            os.umask(old_umask)
        assert {oct(os.stat(p).st_mode & 0o777) for p in p2} == {oct(0o644)}
        err = capsys.readouterr().err
        assert "images: 100%" in err and "2/2" in err and "denoising: 100%" in err and "1/1" in err, err
        a, b = (np.load(p[0][:-4] + ".npz")["pixels"] for p in (p1, p2))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, np.load(p1[1][:-4] + ".npz")["pixels"])
        args.guidance_scale = 1.0
        p3 = smi.generate_images(gen, args, "a cat", None, "", 7, "m", "none")
        assert np.abs(np.load(p3[0][:-4] + ".npz")["latents"] - np.load(p1[0][:-4] + ".npz")["latents"]).max() > 1e-3
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    calls = []
    lines = iter(["a dog", "", "ugly", "12", "a bird", "painting", "", "x", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    smi.interactive_loop(lambda *a: calls.append(a))
    assert calls == [("a dog", "a dog", "ugly", 12)]  # "x" is not a seed: asked again; "" ends


def test_sample_step_callback_and_sequential_guidance(setup):
    """Generator.sample's step callback sees each step's latents; returning True ends the loop there (what
    bench_inference uses to time the first steps of a long schedule). Sequential guidance (negative and
    positive prompt as two U-Net calls) gives the latents of the batched call."""
    import mindspore as ms

    from library.sdxl_schedulers import get_scheduler

    ms.set_context(mode=ms.PYNATIVE_MODE)  # tiny model: no graph compilation needed
    try:
        te1, te2, vae, unet = smi.load_models(setup["ckpt"])
        gen = smi.Generator(te1, te2, vae, unet)
        context, y = gen.conditioning("a cat", "a cat", "", 7.0, 64, 64)
        noise = np.random.default_rng(0).standard_normal((1,) + gen.latent_shape(64, 64)).astype(np.float32)
        seen = []
        full = gen.sample(noise, get_scheduler("euler"), 3, context, y, 7.0,
                          callback=lambda i, latents: seen.append((i, latents.copy())) and False)
        assert [i for i, _ in seen] == [0, 1, 2]
        np.testing.assert_array_equal(seen[-1][1], full)
        part = gen.sample(noise, get_scheduler("euler"), 3, context, y, 7.0, callback=lambda i, latents: i == 1)
        np.testing.assert_array_equal(part, seen[1][1])
        assert np.abs(part - full).max() > 1e-4
        gen.sequential_guidance = True  # --sequential_guidance: one U-Net call per prompt, same latents
        sequential = gen.sample(noise, get_scheduler("euler"), 3, context, y, 7.0)
        assert_close(sequential, full, what="sequential guidance")
        gen.sequential_guidance = False  # --whole_graph_unet: the U-Net step as one cell, same latents
        gen.segmented, gen._denoisers = False, {}
        assert_close(gen.sample(noise, get_scheduler("euler"), 3, context, y, 7.0), full, 1e-5, what="one graph")
        # one-shot generation (not --interactive): the text encoders are dropped after the prompt encoding
        one_shot = smi.Generator(te1, te2, vae, unet, one_shot=True)
        del te1, te2
        context2, y2 = one_shot.conditioning("a cat", "a cat", "", 7.0, 64, 64)
        np.testing.assert_array_equal(context2, context)
        np.testing.assert_array_equal(y2, y)
        assert one_shot.te1 is None and one_shot.te2 is None and gen.te1 is not None
        with pytest.raises(RuntimeError, match="released"):
            one_shot.encode(["a cat"], ["a cat"])
        first = one_shot.sample(noise, get_scheduler("euler"), 2, context, y, 7.0)
        np.testing.assert_array_equal(first, gen.sample(noise, get_scheduler("euler"), 2, context, y, 7.0))
        decoded = gen.decode(first)
        del unet
        one_shot.release_unet()  # before the last decode: weights and compiled step
        assert one_shot.unet is None and not one_shot._denoisers and gen.unet is not None
        with pytest.raises(RuntimeError, match="released"):
            one_shot.sample(noise, get_scheduler("euler"), 2, context, y, 7.0)
        assert one_shot.latent_shape(64, 64) == gen.latent_shape(64, 64)
        np.testing.assert_array_equal(one_shot.decode(first), decoded)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def test_heun_through_the_cli_matches_diffusers_pipeline(setup, tmp_path):
    """A second-order sampler end to end: --sampler heun evaluates the U-Net twice per step (2n-1 entries in
    diffusers' timesteps, the last step a single Euler step) and the final latents match diffusers' SDXL
    pipeline with HeunDiscreteScheduler in SDXL's config. The other new samplers are checked step by step
    in tests/test_samplers.py."""
    (latents, _, png), = _ours(setup, tmp_path / "out", extra=["--sampler", "heun"])
    pipe = _pipeline(setup)
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        ref = pipe(latents=torch.from_numpy(setup["noise"][:1]), output_type="latent", prompt=PROMPT,
                   prompt_2=PROMPT2, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=7.0).images.numpy()
    err = assert_close(latents, ref, what="heun final latents")
    print(f"heun: final latents max abs err {err:.3g} (max |ref| {np.abs(ref).max():.3g})")
    assert np.abs(ref - setup.get("base_latents", ref + 1)).max() > 1e-3  # not Euler's result
    from PIL import Image
    assert Image.open(png).text["sampler"] == "heun"


def test_prompt2_reaches_text_encoder2(setup, tmp_path):
    """kohya's bug (text encoder 1's tokens to text encoder 2, --prompt2 ignored) is fixed: the pooled and
    text encoder 2 context follow --prompt2 tokenized with "!" padding."""
    te1, te2, vae, unet = smi.load_models(setup["ckpt"])
    gen = smi.Generator(te1, te2, vae, unet)
    ctx, pooled = gen.encode([PROMPT], [PROMPT2])
    pipe = _pipeline(setup)
    with torch.no_grad():
        pe, _, ppe, _ = pipe.encode_prompt(PROMPT, prompt_2=PROMPT2, do_classifier_free_guidance=False)
    assert_close(ctx, pe.numpy(), what="context")
    assert_close(pooled, ppe.numpy(), what="pooled")
    ctx_same, pooled_same = gen.encode([PROMPT], [PROMPT])
    assert np.abs(pooled_same - pooled).max() > 1e-3


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_euler_scheduler_matches_diffusers(spacing):
    offset = 1 if spacing == "leading" else 0
    ref = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", timestep_spacing=spacing,
                                           steps_offset=offset)
    ours = get_scheduler("euler", timestep_spacing=spacing, steps_offset=offset)
    rng = np.random.default_rng(0)
    for n in (1, 7, 30, 50):
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-6, atol=0)
        np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=2e-6)
        x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
        eps = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
        for i in (0, n - 1):
            t = ref.timesteps[i]
            ref._step_index = None
            ref._init_step_index(t)
            want_in = ref.scale_model_input(torch.from_numpy(x), t).numpy()
            want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
            np.testing.assert_allclose(ours.scale_model_input(x, i), want_in, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ours.step(eps, i, x), want, rtol=1e-5, atol=1e-5)


# -- errors: one clear line each -------------------------------------------------


def _args(setup, tmp_path, **over):
    a = {"--ckpt_path": setup["ckpt"], "--output_dir": str(tmp_path / "out"), "--width": "64", "--height": "64",
         "--steps": "1", "--device_target": "CPU"}
    a.update(over)
    argv = []
    for k, v in a.items():
        argv += [k] + (v if isinstance(v, list) else [v])
    return argv


@pytest.mark.parametrize("over, message", [
    ({"--ckpt_path": "/nonexistent/model.safetensors"}, "checkpoint not found"),
    ({"--lora_weights": ["/nonexistent/lora.safetensors;0.5"]}, "LoRA file not found"),
    ({"--lora_weights": ["LORA;abc"]}, "is not a number"),
    ({"--width": "100"}, "multiple of 8"),
    ({"--height": "72"}, "is not a multiple of 32"),
    ({"--sampler": "ddpm"}, "--sampler ddpm: supported samplers are"),
    ({"--sampler": "nonsense"}, "supported samplers are euler"),
    ({"--output_dir": "FILE/sub"}, "afile is a file, so no folder can be created under it"),
    ({"--output_dir": "FILE"}, "afile: is a file, not a folder"),
    ({"--dtype": "bf16"}, "bf16 is not supported on CPU"),
])
def test_errors(setup, tmp_path, over, message):
    afile = tmp_path / "afile"
    afile.write_text("x")
    over = {k: ([x.replace("LORA", setup["loras"][0]) for x in v] if isinstance(v, list)
                else v.replace("FILE", str(afile))) for k, v in over.items()}
    with pytest.raises(UserError, match=message) as e:
        smi.main(_args(setup, tmp_path, **over))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # the folder is created when the first image is written


def test_lora_that_does_not_fit(setup, tmp_path):
    from safetensors.torch import save_file
    sd = _kohya_lora(setup["models"], 3)
    key = next(k for k in sd if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    sd[key] = torch.zeros(4, 7)
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    with pytest.raises(UserError, match="bad.safetensors.*shape") as e:
        smi.main(_args(setup, tmp_path, **{"--lora_weights": [bad]}))
    assert "\n" not in str(e.value)
    sd1 = {k.replace("lora_te1_", "lora_te3_"): v for k, v in _kohya_lora(setup["models"], 3).items()}
    other = str(tmp_path / "other.safetensors")
    save_file(sd1, other)
    with pytest.raises(UserError, match="other.safetensors"):
        smi.main(_args(setup, tmp_path, **{"--lora_weights": [other]}))
    # foreign keys: an SD 1.x module name (diffusers block names in kohya keys) and an unknown key format
    for name, key in (("sd1.safetensors", "lora_unet_down_blocks_9_attentions_0_proj_in"),
                      ("odd.safetensors", "model.diffusion_model.input_blocks_1_0_in_layers_2")):
        foreign = str(tmp_path / name)
        save_file({f"{key}.lora_down.weight": torch.zeros(4, 8), f"{key}.lora_up.weight": torch.zeros(8, 4)},
                  foreign)
        with pytest.raises(UserError, match=re.escape(foreign) + ".*tools/convert_weights.py --convert_keys") as e:
            smi.main(_args(setup, tmp_path, **{"--lora_weights": [foreign]}))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # failed runs leave no empty output folder


def test_error_exit_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sdxl_minimal_inference.py"), "--ckpt_path",
                        str(tmp_path / "missing.safetensors"), "--output_dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.safetensors'}: checkpoint not found"]


def test_euler_ancestral_step_matches_diffusers(monkeypatch):
    """Same arithmetic as diffusers' EulerAncestralDiscreteScheduler given the same noise (diffusers' torch
    noise replaced by the numpy draw our step makes)."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    ref = diffusers.EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                    beta_schedule="scaled_linear", timestep_spacing="leading",
                                                    steps_offset=1)
    ours = get_scheduler("euler_a")
    n = 10
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=2e-6)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    for i, t in enumerate(ref.timesteps):
        eps = rng.standard_normal(x.shape).astype(np.float32)
        noise = np.random.default_rng(100 + i).standard_normal(x.shape, dtype=np.float32)
        monkeypatch.setattr(ea, "randn_tensor", lambda *a, **k: torch.from_numpy(noise.copy()))
        np.testing.assert_allclose(ours.scale_model_input(x, i), ref.scale_model_input(torch.from_numpy(x), t).numpy(),
                                   rtol=1e-5, atol=1e-6)
        want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
        got = ours.step(eps, i, x, np.random.default_rng(100 + i))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        x = want


def test_load_dtypes(setup):
    """--dtype fp16: the U-Net is read straight into fp16 (norms fp32); the VAE stays fp32 unless asked."""
    import mindspore as ms

    te1, te2, vae, unet = smi.load_models(setup["ckpt"], None, "fp16", "fp32")
    assert unet.time_embed[0].weight.dtype == ms.float16
    assert {p.dtype for p in unet.out[0].get_parameters()} == {ms.float32}  # GroupNorm
    assert vae.post_quant_conv.weight.dtype == ms.float32
    assert {p.dtype for p in te1.get_parameters()} == {ms.float32}
    _, _, vae16, _ = smi.load_models(setup["ckpt"], None, "fp16", "fp16")
    assert vae16.post_quant_conv.weight.dtype == ms.float16
