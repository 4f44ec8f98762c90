"""Sample images during training (library/train_sampling.py, kohya's sample_images): prompt files as kohya
reads them, kohya's sampling points, the DDIM / DPM-Solver++ / Euler samplers against diffusers (kohya's and
SDXL's configs, the latents after every step), the sampler's orchestration without model compiles, and one
end-to-end training run that writes the sample PNGs."""
import json
import os
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, assert_close  # noqa: E402  (imports library before mindspore)

sys.path.insert(0, os.path.join(ROOT, "tools"))

from library import train_sampling as ts  # noqa: E402
from library.device_utils import UserError  # noqa: E402
from library.sdxl_schedulers import get_kohya_scheduler, get_scheduler  # noqa: E402


# -- prompt files -----------------------------------------------------------------------------------

# (line, the dict kohya's line_to_prompt_dict returns for it)
KOHYA_LINES = [
    ("a photo of a cat --n blurry, low quality --w 1024 --h 768 --d 42 --l 7.5 --s 28 --ss euler_a",
     dict(prompt="a photo of a cat", negative_prompt="blurry, low quality", width=1024, height=768, seed=42,
          scale=7.5, sample_steps=28, sample_sampler="euler_a")),
    ("masterpiece --s 5000 --W 512", dict(prompt="masterpiece", sample_steps=1000, width=512)),  # clamp, any case
    ("x --s 0 --L 3", dict(prompt="x", sample_steps=1, scale=3.0)),
    ("just a prompt", dict(prompt="just a prompt")),
    ("neg last --d 7 --n ugly hands", dict(prompt="neg last", seed=7, negative_prompt="ugly hands")),
]


@pytest.mark.parametrize("line,want", KOHYA_LINES)
def test_line_to_prompt_dict_matches_kohya(line, want):
    assert ts.line_to_prompt_dict(line) == want
    assert ts.line_to_prompt_dict(line, "p.txt:1") == want  # the strict form accepts every kohya option


def test_prompt_text_is_not_read_as_an_option():
    """kohya parses the prompt segment too ('w 512 wolves' sets width 512): not here (a documented fix)."""
    assert ts.line_to_prompt_dict("w 512 wolves --h 64") == dict(prompt="w 512 wolves", height=64)


def test_load_prompts_txt_toml_json(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\n" + KOHYA_LINES[0][0] + "\n   # indented comment\n  just a prompt  \n",
                   encoding="utf-8")
    assert ts.load_prompts(str(txt)) == [dict(KOHYA_LINES[0][1], enum=0), dict(prompt="just a prompt", enum=1)]

    toml_file = tmp_path / "p.toml"
    toml_file.write_text('[prompt]\nnegative_prompt = "lowres"\nsample_steps = 20\nwidth = 64\nheight = 64\n'
                         'scale = 5.0\n\n[[prompt.subset]]\nprompt = "a cat"\nseed = 3\n\n'
                         '[[prompt.subset]]\nprompt = "a dog"\nsample_sampler = "euler"\n')
    base = dict(negative_prompt="lowres", sample_steps=20, width=64, height=64, scale=5.0)
    # kohya: dict(**data["prompt"], **subset) minus "subset", plus "enum"
    assert ts.load_prompts(str(toml_file)) == [dict(base, prompt="a cat", seed=3, enum=0),
                                               dict(base, prompt="a dog", sample_sampler="euler", enum=1)]

    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "a cat", "width": 64, "seed": 5}, "a dog --n ugly --d 6"]))
    assert ts.load_prompts(str(js)) == [dict(prompt="a cat", width=64, seed=5, enum=0),
                                        dict(prompt="a dog", negative_prompt="ugly", seed=6, enum=1)]


@pytest.mark.parametrize("name,text,message", [
    ("p.txt", "ok\nsecond --w 64 --x 3\n", "p.txt:2: '--x 3' is not an option"),
    ("p.txt", "a --w 64px\n", "p.txt:1: option '--w 64px': cannot read the value"),
    ("p.txt", "a --l 1.2.3\n", "p.txt:1: option '--l 1.2.3': cannot read the value"),
    ("p.txt", "a --ss ddpm\n", "p.txt:1: sampler ddpm: supported samplers are euler, k_euler, euler_a, k_euler_a, "
                               "ddim, dpmsolver++, dpmsolver, dpmsingle, pndm, lms, k_lms, heun, dpm_2, k_dpm_2, "
                               "dpm_2_a, k_dpm_2_a"),
    ("p.txt", "a --ss pndm --s 3\n", "p.txt:1: pndm needs at least 4 steps"),
    ("p.txt", "a --g 3.5\n", "p.txt:1: --g / 'guidance_scale' is not used by SDXL sampling"),
    ("p.txt", "# nothing\n\n", "p.txt: no prompts"),
    ("p.txt", "a\nb (c:1.2.3) --n d\n", "p.txt:2: prompt: bad attention weight ':1.2.3)'"),
    ("p.txt", "a --n (c:1.2.3)\n", "p.txt:1: negative_prompt: bad attention weight"),
    ("p.toml", '[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "a"\nsteps = 3\n',
     "p.toml: prompt.subset 1: unknown key 'steps'"),
    ("p.toml", '[prompt]\nprompt = "a"\n', "p.toml: needs a [prompt] table with [[prompt.subset]]"),
    ("p.json", '[{"prompt": "a", "width": "64"}]', "p.json: entry 1: width must be an integer"),
    ("p.json", '{"prompt": "a"}', "p.json: needs a JSON list"),
    ("p.json", '[{"prompt": "a",}]', "p.json: cannot parse JSON"),
    ("p.yaml", "a\n", "p.yaml: sample prompts must be a .txt, .toml or .json file"),
])
def test_prompt_file_errors_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        ts.load_prompts(str(path))
    assert str(e.value).startswith(str(tmp_path) + os.sep) and message in str(e.value), str(e.value)


def test_prompt_sizes_checked_against_the_model(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a --w 1024 --h 1020\n")  # 1020 -> 1016 (kohya rounds to 8): not a multiple of 32
    assert ts.load_prompts(str(path), pixel_multiple=8)[0]["height"] == 1020
    with pytest.raises(UserError, match=r"p.txt:1: height 1016 is not a multiple of 32"):
        ts.load_prompts(str(path), pixel_multiple=32)
    assert ts.round_size(30) == 64 and ts.round_size(1023) == 1016


def _args(**kw):
    base = dict(sample_prompts="p.txt", sample_at_first=False, sample_every_n_steps=None,
                sample_every_n_epochs=None, sample_sampler="ddim", output_name=None, v_parameterization=False)
    base.update(kw)
    return SimpleNamespace(**base)


def _points(args, num_epochs, steps_per_epoch, start_step=0):
    """The trainer's call sequence (before training, after each update, at each epoch end) -> sampled points."""
    calls = [(0, start_step)]
    step = start_step
    for epoch in range(num_epochs):
        for _ in range(steps_per_epoch):
            step += 1
            calls.append((None, step))
        calls.append((epoch + 1, step))
    return [c for c in calls if ts.should_sample(args, *c)]


def test_sampling_points_are_kohyas():
    assert _points(_args(sample_every_n_steps=2), 2, 3) == [(None, 2), (None, 4), (None, 6)]
    assert _points(_args(sample_every_n_steps=2, sample_at_first=True), 1, 2) == [(0, 0), (None, 2)]
    # epochs win: steps ignored; the last epoch end samples too
    assert _points(_args(sample_every_n_steps=1, sample_every_n_epochs=2), 4, 2) == [(2, 4), (4, 8)]
    assert _points(_args(sample_at_first=True), 2, 2) == [(0, 0)]
    assert _points(_args(sample_prompts=None, sample_at_first=True, sample_every_n_steps=1), 1, 2) == []
    # resumed at step 4: kohya's first call (epoch 0) is not step 0; with epochs it samples (0 % n == 0)
    assert _points(_args(sample_at_first=True, sample_every_n_steps=2), 1, 2, start_step=4) == [(None, 6)]
    assert _points(_args(sample_at_first=True, sample_every_n_epochs=1), 1, 2, start_step=4) == [(0, 4), (1, 6)]


def test_check_sample_args(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n")
    args = _args(sample_prompts=str(path), sample_every_n_steps=0, sample_every_n_epochs=-1, sample_at_first=True,
                 sample_sampler="DPMSolver++")
    ts.check_sample_args(args)
    assert args.sample_every_n_steps is None and args.sample_every_n_epochs is None  # kohya: <= 0 disables
    assert args.sample_sampler == "dpmsolver++" and args._sample_name_prefix == ""
    with pytest.raises(UserError, match="--sample_sampler ddpm: supported samplers are"):
        ts.check_sample_args(_args(sample_prompts=str(path), sample_sampler="ddpm"))
    with pytest.raises(UserError, match="--sample_every_n_steps needs --sample_prompts"):
        ts.check_sample_args(_args(sample_prompts=None, sample_every_n_steps=10))
    with pytest.raises(UserError, match="missing.txt: sample prompts file not found"):
        ts.check_sample_args(_args(sample_prompts=str(tmp_path / "missing.txt"), sample_at_first=True))


def test_sample_image_name_is_kohyas():
    assert ts.sample_image_name("lora_", None, 300, 1, 42, "20240102030405") == "lora_000300_01_20240102030405_42"
    assert ts.sample_image_name("", 2, 300, 12, None, "20240102030405") == "e000002_12_20240102030405"


# -- samplers against diffusers -------------------------------------------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _kohya_reference(name, v_pred):
    """kohya's get_my_scheduler: the class with the betas only (+ prediction type), clip_sample forced True."""
    extra = {"prediction_type": "v_prediction"} if v_pred else {}
    if name == "ddim":
        ref = diffusers.DDIMScheduler(**BETAS, **extra)
    elif name == "dpmsolver++":
        ref = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", **extra)
    elif name == "euler":
        ref = diffusers.EulerDiscreteScheduler(**BETAS, **extra)
    if hasattr(ref.config, "clip_sample") and ref.config.clip_sample is False:
        ref.config.clip_sample = True
    return ref


def _sdxl_reference(name, v_pred):
    """The class from SDXL's scheduler_config.json (diffusers' from_config keeps the keys the class has)."""
    cfg = dict(BETAS, timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False,
               prediction_type="v_prediction" if v_pred else "epsilon")
    cls = {"ddim": diffusers.DDIMScheduler, "dpmsolver++": diffusers.DPMSolverMultistepScheduler}[name]
    return cls.from_config(cfg)


def _run_both(ref, ours, n, seed=0, scale_eps=1.0):
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    np.testing.assert_array_equal(np.asarray(ours.timesteps, np.float64), ref.timesteps.numpy().astype(np.float64))
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=2e-6)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 4, 8, 8)) * float(ref.init_noise_sigma)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        eps = (rng.standard_normal(x.shape) * scale_eps).astype(np.float32)  # a fixed sequence of fake outputs
        worst = max(worst, assert_close(ours.scale_model_input(x, i), ref.scale_model_input(x_ref, t).numpy(),
                                        what=f"model input at step {i}"))
        x_ref = ref.step(torch.from_numpy(eps), t, x_ref).prev_sample
        x = ours.step(eps, i, x, None)
        worst = max(worst, assert_close(x, x_ref.numpy(), what=f"latents after step {i} of {n}"))
    return worst


@pytest.mark.parametrize("v_pred", [False, True], ids=["eps", "v"])
@pytest.mark.parametrize("name", ["ddim", "dpmsolver++", "euler"])
def test_kohya_sampler_matches_diffusers_every_step(name, v_pred):
    for n in (1, 2, 3, 10, 30):
        _run_both(_kohya_reference(name, v_pred), get_kohya_scheduler(name, v_pred), n, seed=n)


@pytest.mark.parametrize("v_pred", [False, True], ids=["eps", "v"])
@pytest.mark.parametrize("name", ["ddim", "dpmsolver++"])
def test_sdxl_config_sampler_matches_diffusers_every_step(name, v_pred):
    """sdxl_minimal_inference.py --sampler ddim / dpmsolver++ (SDXL's scheduler config)."""
    for n in (1, 4, 25):
        ours = get_scheduler(name, prediction_type="v_prediction" if v_pred else "epsilon")
        _run_both(_sdxl_reference(name, v_pred), ours, n, seed=n)


def test_ddim_clip_sample_binds():
    """kohya's forced clip_sample: a large model output drives x0 out of [-1, 1]; both clip it the same way."""
    ours = get_kohya_scheduler("ddim")
    assert ours.clip_sample and ours.final_alpha_cumprod == 1.0
    _run_both(_kohya_reference("ddim", False), ours, 5, scale_eps=30.0)


def test_kohya_euler_a_matches_diffusers_with_shared_noise(monkeypatch):
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    ref = diffusers.EulerAncestralDiscreteScheduler(**BETAS)  # kohya: class defaults (linspace, offset 0)
    ours = get_kohya_scheduler("euler_a")
    n = 6
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 4, 8, 8)) * float(ref.init_noise_sigma)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        eps = rng.standard_normal(x.shape).astype(np.float32)
        noise = np.random.default_rng(100 + i).standard_normal(x.shape, dtype=np.float32)
        monkeypatch.setattr(ea, "randn_tensor", lambda *a, **k: torch.from_numpy(noise.copy()))
        x_ref = ref.step(torch.from_numpy(eps), t, x_ref).prev_sample
        x = ours.step(eps, i, x, np.random.default_rng(100 + i))
        assert_close(x, x_ref.numpy(), what=f"euler_a latents after step {i}")


# -- the sampler's orchestration (fake generator: no compile) ----------------------------------------------

def test_sampler_restores_modes_and_leaves_global_rngs_alone(tmp_path):
    """Inside sampling every cell is in eval mode; after it each cell has its own flag back (a LoRA-like child
    in train mode under a parent in eval mode too); random/np.random untouched; noise from the prompt's seed."""
    from mindspore import nn

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.a = nn.Dense(2, 2)
            self.b = nn.Dense(2, 2)

        def construct(self, x):
            return self.b(self.a(x))

    te1, te2, vae, unet = Net(), Net(), Net(), Net()
    vae.config = SimpleNamespace(block_out_channels=(8, 8, 8, 8))
    unet.config = SimpleNamespace(channel_mult=(1, 2))
    te1.set_train(True)
    te2.set_train(False)
    te2.b.set_train(True)  # mixed flags inside one model
    unet.set_train(True)
    before = {id(c): c.training for m in (te1, te2, vae, unet) for _, c in m.cells_and_names()}
    phases = {id(c): c._phase for m in (te1, te2, vae, unet) for _, c in m.cells_and_names()}

    seen = []

    class FakeGen:
        def conditioning(self, prompt, prompt2, negative, scale, width, height, original_size=None, crop=(0, 0),
                         target_size=None):
            seen.append(("cond", prompt, prompt2, negative, scale, width, height, crop))
            return np.zeros((2, 77, 8), np.float32), np.zeros((2, 8), np.float32)

        def latent_shape(self, width, height):
            return (4, height // 8, width // 8)

        def sample(self, noise, scheduler, steps, context, y, scale, rng):
            flags = [c.training for m in (te1, te2, vae, unet) for _, c in m.cells_and_names()]
            seen.append(("sample", noise.copy(), scheduler.name, steps, any(flags)))
            return noise

        def decode(self, latents):
            return np.full((latents.shape[2] * 8, latents.shape[3] * 8, 3), 0.5, np.float32)

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --n dog --w 64 --h 96 --d 5 --s 3 --ss euler_a\nno seed --l 1\n")
    args = _args(sample_prompts=str(prompts), sample_every_n_steps=2, output_name="lo", output_dir=str(tmp_path),
                 pretrained_model_name_or_path="m.safetensors")
    ts.check_sample_args(args)
    sampler = ts.TrainingSampler(args, [te1, te2], vae, unet)
    sampler.gen = FakeGen()
    random.seed(3)
    np.random.seed(3)
    py_state, np_state = random.getstate(), np.random.get_state()
    assert sampler.sample(None, 1) == []  # not a sampling point
    paths = sampler.sample(None, 2)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    assert {id(c): c.training for m in (te1, te2, vae, unet) for _, c in m.cells_and_names()} == before
    assert {id(c): c._phase for m in (te1, te2, vae, unet) for _, c in m.cells_and_names()} == phases

    assert [os.path.basename(p)[:len("lo_000002_00_")] for p in paths] == ["lo_000002_00_", "lo_000002_01_"]
    assert re.fullmatch(r"lo_000002_00_\d{14}_5\.png", os.path.basename(paths[0]))
    assert re.fullmatch(r"lo_000002_01_\d{14}\.png", os.path.basename(paths[1]))  # no seed: no suffix
    assert seen[0] == ("cond", "a cat", "a cat", "dog", 7.5, 64, 96, (0, 0))
    assert seen[2] == ("cond", "no seed", "no seed", "", 1.0, 512, 512, (0, 0))
    _, noise, sampler_name, steps, any_training = seen[1]
    np.testing.assert_array_equal(noise, np.random.default_rng(5).standard_normal((1, 4, 12, 8), dtype=np.float32))
    assert (sampler_name, steps, any_training) == ("euler_a", 3, False)
    assert seen[3][2:] == ("ddim", 30, False)  # defaults: --sample_sampler, 30 steps

    from PIL import Image

    img = Image.open(paths[0])
    assert img.size == (64, 96)
    assert {k: img.text[k] for k in ("prompt", "negative_prompt", "seed", "steps", "scale", "sampler", "step")} == \
        dict(prompt="a cat", negative_prompt="dog", seed="5", steps="3", scale="7.5", sampler="euler_a", step="2")
    assert int(Image.open(paths[1]).text["seed"]) >= 0  # the drawn seed is recorded

    # data parallel: process i of n samples prompts[i::n] (kohya's split)
    second = ts.TrainingSampler(args, [te1, te2], vae, unet, rank=1, world_size=2)
    second.gen = FakeGen()
    assert [os.path.basename(p)[:len("lo_000004_01_")] for p in second.sample(None, 4)] == ["lo_000004_01_"]


def test_penultimate_hidden_state_with_all_or_one_state():
    """Generator.encode picks the penultimate state whether the encoder returns all states (training's
    encoders, prepare_models=False) or only that one (inference)."""
    from library.sdxl_pipeline import penultimate_hidden_state

    tm = SimpleNamespace(num_layers=3, hidden_state_indices=(0, 1, 2, 3))
    te = SimpleNamespace(text_model=tm)
    assert penultimate_hidden_state(te, ("s0", "s1", "s2", "s3")) == "s2"
    tm.hidden_state_indices = (2,)
    assert penultimate_hidden_state(te, ("s2",)) == "s2"


# -- end to end ----------------------------------------------------------------------------------------

def test_training_writes_kohya_named_samples(tmp_path):
    """--sample_at_first + --sample_every_n_steps 2 on the tiny checkpoint (2 steps, U-Net LoRA): PNGs under
    <output_dir>/sample with kohya's names at step 0 (e000000) and step 2, seeds and prompts in the metadata;
    the images after 2 updates differ from those before training (the LoRA being trained is applied)."""
    import make_tiny_train_demo as demo
    from PIL import Image

    ckpt = str(tmp_path / "tiny.safetensors")
    demo.write_checkpoint(ckpt, seed=0, small=True)
    _, dataset = demo.write_dataset(str(tmp_path), 2, seed=2, subset="class_tokens = 'shq'")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts, tiny sizes\nshq, a red square --n blurry --w 64 --h 64 --d 1 --s 2\n"
                       "shq, a blue circle --w 64 --h 64 --d 2 --s 3 --l 4 --ss euler_a\n")
    out = tmp_path / "out"
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sdxl_train_network.py"), "--pretrained_model_name_or_path", ckpt,
         "--dataset_config", str(dataset), "--output_dir", str(out), "--output_name", "sm", "--network_module",
         "networks.lora", "--network_dim", "4", "--learning_rate", "2e-2", "--max_train_steps", "2",
         "--network_train_unet_only",
         "--max_data_loader_n_workers", "0", "--seed", "1", "--sample_prompts", str(prompts),
         "--sample_every_n_steps", "2", "--sample_at_first"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(out / "sample"))
    assert len(files) == 4, files
    by_key = {}
    for f in files:
        m = re.fullmatch(r"sm_(e000000|000002)_(0[01])_(\d{14})_([12])\.png", f)
        assert m, f
        assert m.group(4) == str(int(m.group(2)) + 1)  # the prompt's seed suffix
        by_key[(m.group(1), m.group(2))] = np.asarray(Image.open(out / "sample" / f).convert("RGB"), np.int16)
        meta = Image.open(out / "sample" / f).text
        assert meta["sampler"] == ("ddim" if m.group(2) == "00" else "euler_a") and meta["width"] == "64"
    assert set(by_key) == {("e000000", "00"), ("e000000", "01"), ("000002", "00"), ("000002", "01")}
    for i in ("00", "01"):
        before, after = by_key[("e000000", i)], by_key[("000002", i)]
        assert before.shape == (64, 64, 3) and before.std() > 1  # an image, not a constant
        assert np.abs(after - before).max() >= 2, (i, np.abs(after - before).max())
    assert "sm.safetensors" in os.listdir(out)
