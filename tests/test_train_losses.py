"""Loss types, huber schedules, masked loss and multires noise against kohya's formulas.

References: kohya's ``conditional_loss`` / ``get_huber_threshold_if_needed`` / ``apply_masked_loss`` /
``pyramid_noise_like`` written out in torch here (torch's own ``nn.Upsample`` and ``F.interpolate``),
diffusers' DDPMScheduler for ``alphas_cumprod``. The MindSpore side is the graph-mode elementwise loss of
the SDXL loss cell (``library.train_losses``) and the host-side numpy of ``custom_train_functions``.
"""
import argparse
import csv
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close  # noqa: E402  (conftest imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn, ops  # noqa: E402

from library import custom_train_functions as ctf  # noqa: E402
from library.device_utils import UserError  # noqa: E402
from library.train_losses import masked_per_sample_loss  # noqa: E402


def _huber_args(schedule, c=0.1, scale=1.0, loss_type="huber"):
    return argparse.Namespace(loss_type=loss_type, huber_schedule=schedule, huber_c=c, huber_scale=scale)


def _kohya_huber_c(args, timesteps, alphas_cumprod):
    """kohya's get_huber_threshold_if_needed, in torch."""
    if args.huber_schedule == "exponential":
        alpha = -math.log(args.huber_c) / 1000
        return torch.exp(-alpha * timesteps) * args.huber_scale
    if args.huber_schedule == "snr":
        ac = torch.index_select(alphas_cumprod, 0, timesteps)
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - args.huber_c) / (1 + sigmas) ** 2 + args.huber_c
    return torch.full((timesteps.shape[0],), args.huber_c * args.huber_scale)


def _kohya_conditional_loss(pred, target, loss_type, huber_c):
    """kohya's conditional_loss(..., reduction="none"), in torch."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_c.view(-1, 1, 1, 1)
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    return 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)


@pytest.mark.parametrize("schedule,c,scale", [("constant", 0.1, 1.0), ("constant", 0.3, 2.0),
                                              ("exponential", 0.1, 1.0), ("exponential", 0.05, 1.5),
                                              ("snr", 0.1, 1.0), ("snr", 0.2, 3.0)])
def test_huber_threshold_schedules_match_kohya(schedule, c, scale):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    t = np.array([0, 1, 17, 250, 500, 777, 999])
    args = _huber_args(schedule, c, scale)
    ours = ctf.get_huber_threshold_if_needed(args, t, ctf.NoiseSchedule())
    ref = _kohya_huber_c(args, torch.tensor(t), sched.alphas_cumprod).numpy()
    assert ours.dtype == np.float32 and ours.shape == (len(t),)
    np.testing.assert_allclose(ours, ref, rtol=2e-6)
    assert ctf.get_huber_threshold_if_needed(_huber_args(schedule, loss_type="l2"), t, ctf.NoiseSchedule()) is None
    if schedule == "snr":  # huber_scale is not used by kohya's snr schedule; t=0 -> ~1, t=999 -> ~c
        assert ours[0] > 0.9 and abs(ours[-1] - c) < 0.05
    # zero terminal SNR: alpha_bar_999 = 0, sigma = inf -> huber_c (no NaN)
    z = ctf.get_huber_threshold_if_needed(args, np.array([999]), ctf.NoiseSchedule(zero_terminal_snr=True))
    assert np.isfinite(z).all()


class _LossOnly(nn.Cell):
    """The loss cell's tail: mean_b(weights * masked_per_sample_loss), plus d loss / d pred."""

    def __init__(self, loss_type):
        super().__init__()
        self.loss_type = loss_type

    def construct(self, pred, target, huber_c, mask, weights):
        return ops.mean(masked_per_sample_loss(pred, target, self.loss_type, huber_c, mask) * weights)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_loss_types_and_mask_in_graph_match_kohya(loss_type):
    """Loss and its gradient wrt the prediction on fixed inputs (with an alpha mask, area-resized as
    kohya) equal kohya's formula in torch; the unmasked case equals the plain mean."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(1)
    b, h, w = 3, 6, 5
    pred = rng.standard_normal((b, 4, h, w)).astype(np.float32)
    target = rng.standard_normal((b, 4, h, w)).astype(np.float32) * 2
    t = np.array([5, 400, 990])
    huber_c = ctf.get_huber_threshold_if_needed(_huber_args("snr"), t, ctf.NoiseSchedule())
    huber_c = np.ones(b, np.float32) if huber_c is None else huber_c
    alpha = rng.random((b, h * 8, w * 8)).astype(np.float32)
    alpha[0] = 1.0  # a sample whose image had no alpha channel
    weights = np.array([1.0, 0.5, 2.0], np.float32)
    mask = ctf.loss_mask_for_batch({"alpha_masks": alpha}, pred.shape)

    cell = _LossOnly(loss_type)
    grad = ops.GradOperation()(cell)
    ms_in = [Tensor(x) for x in (pred, target, huber_c, mask, weights)]
    loss = cell(*ms_in).asnumpy()
    g = grad(*ms_in).asnumpy()

    tp = torch.tensor(pred, requires_grad=True)
    el = _kohya_conditional_loss(tp, torch.tensor(target), loss_type, torch.tensor(huber_c))
    tmask = F.interpolate(torch.tensor(alpha).unsqueeze(1), size=(h, w), mode="area")  # kohya apply_masked_loss
    ref = ((el * tmask).mean(dim=(1, 2, 3)) * torch.tensor(weights)).mean()
    ref.backward()
    assert_close(loss, ref.detach().numpy(), what=f"{loss_type} loss")
    assert_close(g, tp.grad.numpy(), 1e-4, what=f"{loss_type} d loss / d pred")
    # the same formula in numpy (the host reference)
    np_ref = (ctf.conditional_loss(pred, target, loss_type, huber_c) * mask).mean((1, 2, 3)) @ weights / b
    assert_close(loss, np_ref, what=f"{loss_type} loss vs numpy")
    # the mask matters: unmasked differs, and ones reproduce the plain mean exactly
    ones = np.ones_like(mask)
    unmasked = cell(*ms_in[:3], Tensor(ones), ms_in[4]).asnumpy()
    assert abs(unmasked - loss) > 1e-3
    plain = (ctf.conditional_loss(pred, target, loss_type, huber_c).mean((1, 2, 3)) * weights).mean()
    assert_close(unmasked, plain, what=f"{loss_type} unmasked")
    if loss_type == "l2":  # today's l2 path, op for op
        plain_ms = ops.mean(ops.mean(ops.square(ms_in[0] - ms_in[1]), (1, 2, 3)) * ms_in[4]).asnumpy()
        assert unmasked == plain_ms


@pytest.mark.parametrize("src,dst", [((1, 1), (16, 16)), ((3, 5), (16, 24)), ((7, 4), (9, 13)), ((8, 8), (8, 8)),
                                     ((2, 9), (17, 10))])
def test_upsample_bilinear_matches_torch(src, dst):
    x = np.random.default_rng(2).standard_normal((2, 3) + src).astype(np.float32)
    ref = torch.nn.Upsample(size=dst, mode="bilinear")(torch.tensor(x)).numpy()
    assert_close(ctf.upsample_bilinear(x, dst), ref, 1e-6, what=f"upsample {src}->{dst}")


@pytest.mark.parametrize("src,dst", [((64, 48), (8, 6)), ((30, 20), (4, 3)), ((17, 9), (5, 7))])
def test_resize_area_matches_torch(src, dst):
    x = np.random.default_rng(3).random((2, 1) + src).astype(np.float32)
    ref = F.interpolate(torch.tensor(x), size=dst, mode="area").numpy()
    assert_close(ctf.resize_area(x, dst), ref, 1e-6, what=f"area {src}->{dst}")


def _kohya_pyramid_noise_like(noise, iterations, discount, draws):
    """kohya's pyramid_noise_like line by line (torch Upsample, torch std); ``draws`` replaces
    random.random() and torch.randn with recorded values."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = draws.random() * 2 + 2
        wn, hn = max(1, int(w / (r ** i))), max(1, int(h / (r ** i)))
        noise += u(torch.tensor(draws.standard_normal((b, c, wn, hn)).astype(np.float32))) * discount ** i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("iterations,discount,shape", [(6, 0.3, (2, 4, 16, 24)), (10, 0.8, (1, 4, 12, 12)),
                                                       (2, 0.5, (3, 4, 8, 16))])
def test_pyramid_noise_matches_kohya(iterations, discount, shape):
    noise = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    ours = ctf.pyramid_noise_like(noise, np.random.default_rng(9), iterations, discount)
    ref = _kohya_pyramid_noise_like(torch.tensor(noise), iterations, discount, np.random.default_rng(9)).numpy()
    assert_close(ours, ref, 1e-5, what="pyramid noise")
    assert abs(ours.std(ddof=1) - 1.0) < 1e-5
    assert np.abs(ours - noise / noise.std(ddof=1)).max() > 0.1  # the low-frequency levels were added
    assert ctf.pyramid_noise_like(noise, np.random.default_rng(9), None, discount) is noise


def test_loss_extra_inputs_and_checks():
    s = ctf.NoiseSchedule()
    t = np.array([10, 900])
    c, mask = ctf.loss_extra_inputs(argparse.Namespace(loss_type="l2"), {"alpha_masks": None}, t, s, (2, 4, 3, 5))
    assert (c == 1).all() and c.dtype == np.float32 and mask.shape == (2, 1, 3, 5) and (mask == 1).all()
    alpha = np.zeros((2, 24, 40), np.float32)
    alpha[:, :8, :8] = 1.0  # only the top-left latent pixel visible
    c, mask = ctf.loss_extra_inputs(_huber_args("constant", 0.2, 2.0), {"alpha_masks": alpha}, t, s, (2, 4, 3, 5))
    np.testing.assert_allclose(c, 0.4, rtol=1e-6)
    assert mask[:, 0, 0, 0].tolist() == [1.0, 1.0] and mask.sum() == 2.0

    with pytest.raises(UserError, match="huber_c"):
        ctf.check_loss_args(_huber_args("exponential", 0.0))
    with pytest.raises(UserError, match="multires"):
        ctf.check_loss_args(argparse.Namespace(loss_type="l2", multires_noise_iterations=-1))

    class _Sub:
        def __init__(self, alpha_mask):
            self.alpha_mask = alpha_mask

    group = argparse.Namespace(datasets=[argparse.Namespace(subsets=[_Sub(False)])])
    with pytest.raises(UserError, match="alpha_mask"):
        ctf.check_loss_args(argparse.Namespace(loss_type="l2", masked_loss=True), group)
    group.datasets[0].subsets.append(_Sub(True))
    ctf.check_loss_args(argparse.Namespace(loss_type="l2", masked_loss=True), group)


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_alpha_masks_reach_the_batch(tmp_path, cache):
    """An RGBA image in an alpha_mask subset yields batch["alpha_masks"] = alpha / 255 (flipped with the
    image), with and without cached latents; an RGB image in the same batch gets ones."""
    from PIL import Image

    from dataset_helpers import CACHE_ARGV, cache_stub_latents, dataset_toml, masked_samples, parse_args, write_toml
    from library import config_util, train_util

    d = tmp_path / "img"
    d.mkdir()
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "b.png")
    for n in ("a", "b"):
        (d / f"{n}.txt").write_text("x")
    subset = dict(image_dir=d, alpha_mask=True, flip_aug=True)
    cfg = write_toml(tmp_path / "ds.toml", dataset_toml(dict(subsets=[subset]), resolution=64, batch_size=2,
                                                        caption_extension=".txt"))
    args = parse_args(["--dataset_config", cfg, *CACHE_ARGV[cache]])
    random.seed(0)
    group, _ = config_util.build_dataset_groups(args)
    train_util.verify_dataset_args(args, group)
    cache_stub_latents(group, cache)
    seen_flip = set()
    alpha = rgba[:, :, 3].astype(np.float32) / 255.0
    for _, _, key, flip, mask in masked_samples(group, cache):
        if key.endswith("a.png"):
            np.testing.assert_array_equal(mask, alpha[:, ::-1] if flip else alpha)
            seen_flip.add(flip)
        else:
            assert (mask == 1).all()
    assert seen_flip == {True, False}


def test_masked_huber_multires_training_end_to_end(tmp_path):
    """sdxl_train_network.py with an alpha-mask subset (an RGBA PNG) and a conditioning_data_dir subset (an
    opaque RGB PNG whose mask image is all black), cached latents, --masked_loss, --loss_type huber (snr
    schedule), multires noise on top of a noise offset: it trains, and the masks reach the compiled step:
    the black-masked image's steps have loss exactly 0, the half-transparent one's not."""
    from PIL import Image

    from test_train_network import _run  # also puts tools/ on sys.path

    import make_tiny_train_demo as demo

    ckpt = str(tmp_path / "tiny_sdxl.safetensors")
    demo.write_checkpoint(ckpt, seed=0, small=True)
    images, cond_images, masks = tmp_path / "img", tmp_path / "cond_img", tmp_path / "masks"
    for d in (images, cond_images, masks):
        d.mkdir()
    rng = np.random.default_rng(6)
    half = np.repeat(np.where(np.arange(64) < 32, 255, 0)[None], 64, 0).astype(np.uint8)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, half]), "RGBA").save(images / "half.png")
    (images / "half.txt").write_text("a half picture")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(cond_images / "clear.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(masks / "clear.png")  # red 0: all masked out
    (cond_images / "clear.txt").write_text("a clear picture")
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"""[general]
resolution = 64
batch_size = 1
caption_extension = '.txt'

[[datasets]]
  [[datasets.subsets]]
  image_dir = '{images}'
  alpha_mask = true

[[datasets]]
  [[datasets.subsets]]
  image_dir = '{cond_images}'
  conditioning_data_dir = '{masks}'
""")
    out = tmp_path / "out"
    proc = _run(["--pretrained_model_name_or_path", ckpt, "--dataset_config", dataset, "--output_dir", out,
                 "--output_name", "m", "--network_module", "networks.lora", "--network_dim", 4,
                 "--network_train_unet_only", "--learning_rate", 1e-3, "--max_train_steps", 4, "--seed", 3,
                 "--max_data_loader_n_workers", 0, "--cache_latents", "--masked_loss", "--loss_type", "huber",
                 "--huber_schedule", "snr", "--huber_c", 0.2, "--multires_noise_iterations", 4,
                 "--multires_noise_discount", 0.5, "--noise_offset", 0.05])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "m_loss.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses
    assert sorted(l == 0.0 for l in losses) == [False, False, True, True], losses  # one of each image per epoch
    from library.lora_file import load_state_dict_file

    sd = load_state_dict_file(str(out / "m.safetensors"))[0]
    ups = [np.asarray(v) for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert all(np.isfinite(u).all() for u in ups) and max(np.abs(u).max() for u in ups) > 0
