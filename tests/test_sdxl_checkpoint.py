"""SDXL checkpoint loading/saving (library.sdxl_model_util) against torch references.

A tiny SDXL-topology model (diffusers UNet with text_time, AutoencoderKL,
transformers CLIPTextModel + CLIPTextModelWithProjection) with random weights is
written as a diffusers folder and as an SAI single file (the test's own key map,
checked by loading it back with diffusers' single-file loaders from a local config
folder). Our loader on either form must reproduce torch's UNet, text encoder
(hidden states, pooled/projected) and VAE outputs; saving is bit-exact.
"""
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_close

import mindspore as ms
from mindspore import Tensor

import sdxl_checkpoint_helpers as H
from library import safetensors_io as sio
from library.device_utils import UserError
from library.sdxl_model_util import (CheckpointInfo, load_models_from_sdxl_checkpoint, load_vae,
                                     save_stable_diffusion_checkpoint)
from library.sdxl_original_unet import get_size_embeddings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_ckpt")
    models = H.build_torch_models()
    folder = str(root / "diffusers")
    H.save_diffusers_folder(models, folder)
    sd = H.sai_state_dict(models)
    sai = str(root / "tiny_sdxl.safetensors")
    H.save_sai_file(sd, sai)
    inp = H.make_inputs()
    ref = H.torch_outputs(models, inp)
    return dict(root=root, models=models, folder=folder, sd=sd, sai=sai, inp=inp, ref=ref)


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)  # numerics equal to graph mode, without compile time
    yield


def _ours_outputs(te1, te2, vae, unet, inp):
    o1 = te1(Tensor(inp["ids1"]))
    o2 = te2(Tensor(inp["ids2"]))
    size = get_size_embeddings(inp["time_ids"][:, 0:2], inp["time_ids"][:, 2:4], inp["time_ids"][:, 4:6],
                               dim=H.TIME_DIM)
    y = np.concatenate([inp["pooled"], size], -1).astype(np.float32)
    out = unet(Tensor(inp["x"]), Tensor(inp["t"]), Tensor(inp["context"]), Tensor(y))
    mean, logvar = vae.encode(Tensor(inp["image"]))
    dec = vae.decode(mean)
    return dict(te1_hidden=[h.asnumpy() for h in o1[-1]], te1_last=o1[0].asnumpy(), te1_pooled=o1[1].asnumpy(),
                te2_hidden=[h.asnumpy() for h in o2[-1]], te2_last=o2[0].asnumpy(), te2_embeds=o2[2].asnumpy(),
                unet=out.asnumpy(), vae_mean=mean.asnumpy(), vae_logvar=logvar.asnumpy(), vae_dec=dec.asnumpy())


def _compare(ours, ref, label):
    errors = {}
    for key, value in ref.items():
        if isinstance(value, list):
            assert len(ours[key]) == len(value), f"{label} {key}: {len(ours[key])} hidden states, ref {len(value)}"
            errors[key] = max(assert_close(a, b, what=f"{label} {key}[{i}]")
                              for i, (a, b) in enumerate(zip(ours[key], value)))
        else:
            errors[key] = assert_close(ours[key], value, what=f"{label} {key}")
    return errors


# ---------------------------------------------------------------------------
# the reference: diffusers' single-file loaders accept the test's SAI file


def test_sai_file_matches_diffusers_from_single_file(tiny):
    """diffusers' from_single_file (UNet, VAE) and its CLIP single-file conversion (what
    StableDiffusionXLPipeline.from_single_file runs per text encoder), given the local config
    folder, rebuild exactly the torch models: the file layout and the text_projection orientation
    are SDXL's as diffusers reads them."""
    import safetensors.torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    folder, sai, models = tiny["folder"], tiny["sai"], tiny["models"]
    unet = UNet2DConditionModel.from_single_file(sai, config=folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(sai, config=folder, subfolder="vae", local_files_only=True)
    ckpt = safetensors.torch.load_file(sai)
    te1 = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, ckpt, subfolder="text_encoder",
                                               config=folder, local_files_only=True)
    te2 = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModelWithProjection, ckpt,
                                               subfolder="text_encoder_2", config=folder, local_files_only=True)
    for name, loaded in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2)):
        want = {k: v for k, v in models[name].state_dict().items() if not k.endswith("position_ids")}
        got = {k: v for k, v in loaded.state_dict().items() if not k.endswith("position_ids")}
        assert set(got) == set(want), name
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name}.{k}"


# ---------------------------------------------------------------------------
# loading


def test_load_sai_single_file_matches_torch(tiny):
    te1, te2, vae, unet, logit_scale, info = load_models_from_sdxl_checkpoint(
        tiny["sai"], head_dim=H.HEAD_DIM)
    assert isinstance(info, CheckpointInfo) and info.format == "safetensors"
    assert info.epoch is None and info.vae_attention_as_conv
    assert np.asarray(logit_scale).item() == pytest.approx(4.6052)
    assert unet.config.transformer_depth == (0, 1, 2) and unet.config.channel_mult == (1, 2, 4)
    assert te2.config.projection_dim == H.TE2["projection_dim"]
    errors = _compare(_ours_outputs(te1, te2, vae, unet, tiny["inp"]), tiny["ref"], "single file")
    print("max abs errors (single file):", {k: f"{v:.2e}" for k, v in errors.items()})


def test_load_diffusers_folder_matches_torch(tiny):
    te1, te2, vae, unet, logit_scale, info = load_models_from_sdxl_checkpoint(tiny["folder"])
    assert info.format == "diffusers" and logit_scale is None
    errors = _compare(_ours_outputs(te1, te2, vae, unet, tiny["inp"]), tiny["ref"], "diffusers folder")
    print("max abs errors (diffusers folder):", {k: f"{v:.2e}" for k, v in errors.items()})


@pytest.mark.parametrize("layout", ["sai", "folder"])
def test_unet_read_after_the_other_models_equals_one_load(tiny, layout):
    """The trainer's split load (the U-Net read once the text encoders are freed): ``with_unet=False``
    reads every other model, ``load_unet_from_sdxl_checkpoint`` the U-Net, each as the one load does."""
    from library.sdxl_checkpoint import load_unet_from_sdxl_checkpoint

    path = tiny[layout]
    whole = load_models_from_sdxl_checkpoint(path, head_dim=H.HEAD_DIM, unet_dtype="fp16")
    parts = load_models_from_sdxl_checkpoint(path, head_dim=H.HEAD_DIM, unet_dtype="fp16", with_unet=False)
    assert parts[3] is None
    parts = parts[:3] + (load_unet_from_sdxl_checkpoint(path, head_dim=H.HEAD_DIM, unet_dtype="fp16"),)
    for ours, ref in zip(parts, whole[:4]):
        a = {p.name: p.asnumpy() for p in ours.get_parameters()}
        b = {p.name: p.asnumpy() for p in ref.get_parameters()}
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_pooled_output_follows_sgm_not_kohya(tiny):
    """pooled = x_eos @ P with P the stored OpenCLIP matrix (diffusers/SGM); kohya's x_eos @ P.T differs."""
    te1, te2, *_ = load_models_from_sdxl_checkpoint(tiny["sai"], head_dim=H.HEAD_DIM)
    out = te2(Tensor(tiny["inp"]["ids2"]))
    pooled, embeds = out[1].asnumpy(), out[2].asnumpy()
    P = tiny["sd"]["conditioner.embedders.1.model.text_projection"].numpy()
    assert P.shape == (H.TE2["hidden_size"], H.TE2["projection_dim"])
    assert_close(embeds, pooled @ P, what="x_eos @ P")


def test_load_mindspore_ckpt_and_linear_vae_attention(tiny):
    """A MindSpore .ckpt with the SAI keys (mindspore.save_checkpoint), VAE attention stored as linear."""
    sd = H.sai_state_dict(tiny["models"], attention_as_conv=False)
    path = str(tiny["root"] / "tiny_sdxl.ckpt")
    ms.save_checkpoint([{"name": k, "data": Tensor(v.numpy())} for k, v in sd.items()], path)
    loaded = load_models_from_sdxl_checkpoint(path, head_dim=H.HEAD_DIM)
    info = loaded[-1]
    assert info.format == "mindspore" and not info.vae_attention_as_conv
    # same parameters as from the safetensors file, whose outputs are checked against torch above
    reference = load_models_from_sdxl_checkpoint(tiny["sai"], head_dim=H.HEAD_DIM)
    for ours, ref in zip(loaded[:4], reference[:4]):
        a = {p.name: p.asnumpy() for p in ours.get_parameters()}
        b = {p.name: p.asnumpy() for p in ref.get_parameters()}
        assert set(a) == set(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    assert loaded[4] == reference[4]


def test_fp16_dtype_argument(tiny):
    """dtype applies to the U-Net and VAE Linear/Conv weights (kohya); text encoders stay fp32."""
    te1, te2, vae, unet, *_ = load_models_from_sdxl_checkpoint(tiny["sai"], dtype="fp16", head_dim=H.HEAD_DIM)
    assert unet.input_blocks[0][0].weight.dtype == ms.float16
    assert vae.encoder.conv_in.weight.dtype == ms.float16
    assert te1.text_model.embeddings.token_embedding.weight.dtype == ms.float32
    w = unet.input_blocks[0][0].weight.asnumpy()
    assert np.array_equal(w, tiny["sd"]["model.diffusion_model.input_blocks.0.0.weight"].numpy().astype(np.float16))


def test_vae_override(tiny):
    """--vae: a separate VAE (LDM file, diffusers file, diffusers folder) replaces the checkpoint's."""
    import safetensors.torch

    other = H.build_torch_models(seed=7)["vae"]
    ref_mean = other.encode(torch.tensor(tiny["inp"]["image"])).latent_dist.mean.detach().numpy()
    ldm = str(tiny["root"] / "vae_ldm.safetensors")
    safetensors.torch.save_file({k[len("first_stage_model."):]: v.contiguous()
                                 for k, v in H.vae_to_sai(other.state_dict()).items()}, ldm)
    du_file = str(tiny["root"] / "vae_diffusers.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in other.state_dict().items()}, du_file)
    du_folder = str(tiny["root"] / "vae_folder")
    other.save_pretrained(du_folder, safe_serialization=True)
    for source in (ldm, du_file, du_folder):
        vae = load_vae(source)
        assert_close(vae.encode(Tensor(tiny["inp"]["image"]))[0].asnumpy(), ref_mean, what=f"vae {source}")
    *_, vae, unet, _, info = load_models_from_sdxl_checkpoint(tiny["sai"], vae_path=ldm, head_dim=H.HEAD_DIM)
    assert_close(vae.encode(Tensor(tiny["inp"]["image"]))[0].asnumpy(), ref_mean, what="vae override")


# ---------------------------------------------------------------------------
# saving


def _assert_same_file(a, b):
    ra, rb = sio.open_weights(a), sio.open_weights(b)
    with ra, rb:
        assert set(ra.keys()) == set(rb.keys()), (set(ra.keys()) ^ set(rb.keys()))
        for k in ra.keys():
            assert ra.raw_dtype(k) == rb.raw_dtype(k), k
            assert ra.shape(k) == rb.shape(k), k
            assert np.array_equal(ra.get_raw(k), rb.get_raw(k)), k


@pytest.mark.parametrize("precision,torch_dtype", [("float", None), ("fp16", torch.float16),
                                                   ("bf16", torch.bfloat16)])
def test_round_trip_bit_exact(tiny, precision, torch_dtype):
    src = tiny["sai"]
    if torch_dtype is not None:
        src = str(tiny["root"] / f"src_{precision}.safetensors")
        H.save_sai_file(tiny["sd"], src, torch_dtype)
    te1, te2, vae, unet, logit_scale, info = load_models_from_sdxl_checkpoint(src, head_dim=H.HEAD_DIM)
    out = str(tiny["root"] / f"out_{precision}.safetensors")
    n = save_stable_diffusion_checkpoint(out, te1, te2, unet, 0, 0, info, vae, logit_scale,
                                         {"ss_test": "1"}, save_dtype=precision)
    assert n == len(tiny["sd"])
    _assert_same_file(src, out)
    import safetensors

    with safetensors.safe_open(out, "pt") as f:  # readable by the reference library, metadata kept
        assert f.metadata() == {"ss_test": "1"}
        if torch_dtype is not None:
            key = "model.diffusion_model.out.2.weight"
            assert torch.equal(f.get_tensor(key), tiny["sd"][key].to(torch_dtype))


def test_save_mindspore_ckpt_round_trip(tiny):
    te1, te2, vae, unet, logit_scale, info = load_models_from_sdxl_checkpoint(tiny["sai"], head_dim=H.HEAD_DIM)
    out = str(tiny["root"] / "saved.ckpt")
    save_stable_diffusion_checkpoint(out, te1, te2, unet, 1, 10, info, vae, logit_scale, None)
    _assert_same_file(tiny["sai"], out)
    loaded = ms.load_checkpoint(out)  # MindSpore's own reader agrees
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert np.array_equal(loaded[key].asnumpy(), tiny["sd"][key].numpy())


def test_save_from_diffusers_folder_gives_sai_layout(tiny):
    te1, te2, vae, unet, logit_scale, info = load_models_from_sdxl_checkpoint(tiny["folder"])
    out = str(tiny["root"] / "from_folder.safetensors")
    save_stable_diffusion_checkpoint(out, te1, te2, unet, 0, 0, info, vae, np.float32(4.6052), None)
    with sio.open_weights(out) as r:
        keys = set(r.keys())
        want = set(tiny["sd"]) - {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids"}
        assert keys == want
        for k in want:
            assert np.array_equal(r.get(k), tiny["sd"][k].numpy()), k


# ---------------------------------------------------------------------------
# errors


def _raises(path, *fragments, **kwargs):
    with pytest.raises(UserError) as e:
        load_models_from_sdxl_checkpoint(path, head_dim=H.HEAD_DIM, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_error_missing_file(tmp_path):
    _raises(str(tmp_path / "nope.safetensors"), "not found")


def test_error_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("hello, this is not a model\n" * 10)
    _raises(str(p), "not a checkpoint")
    p = tmp_path / "other.safetensors"
    sio.write_safetensors(str(p), [("foo.weight", "F32", (2,), lambda: np.zeros(2, np.float32))])
    _raises(str(p), "not an SDXL checkpoint", "foo.weight")


def test_error_truncated(tiny, tmp_path):
    p = tmp_path / "cut.safetensors"
    data = open(tiny["sai"], "rb").read()
    p.write_bytes(data[:len(data) // 2])
    _raises(str(p), "truncated")
    p.write_bytes(data[:100])
    _raises(str(p), str(p))
    ck = tmp_path / "cut.ckpt"
    ms.save_checkpoint([{"name": "a", "data": Tensor(np.ones((64, 64), np.float32))}], str(ck))
    ck.write_bytes(ck.read_bytes()[:5000])
    _raises(str(ck), "truncated")


def test_error_torch_pickle_refused(tmp_path):
    for new_zip in (True, False):
        p = tmp_path / f"model_{new_zip}.ckpt"
        torch.save({"state_dict": {"a": torch.ones(1)}}, str(p), _use_new_zipfile_serialization=new_zip)
        _raises(str(p), "pickle", "safetensors", "not loaded")


def _variant(tiny, tmp_path, name, edit):
    sd = dict(tiny["sd"])
    edit(sd)
    p = str(tmp_path / name)
    H.save_sai_file(sd, p)
    return p


def test_error_missing_keys(tiny, tmp_path):
    def drop(sd):
        for k in ("model.diffusion_model.out.0.bias", "model.diffusion_model.time_embed.2.weight"):
            del sd[k]
    msg = _raises(_variant(tiny, tmp_path, "missing.safetensors", drop), "2 missing key(s)",
                  "model.diffusion_model.out.0.bias", "model.diffusion_model.time_embed.2.weight")
    assert "U-Net" in msg

    def drop_qkv(sd):
        del sd["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias"]
    _raises(_variant(tiny, tmp_path, "missing2.safetensors", drop_qkv), "1 missing key(s)",
            "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias")

    def drop_vae(sd):
        for k in [k for k in sd if k.startswith("first_stage_model.")]:
            del sd[k]
    _raises(_variant(tiny, tmp_path, "novae.safetensors", drop_vae), "VAE is missing")


def test_error_unexpected_keys(tiny, tmp_path):
    def add(sd):
        sd["model.diffusion_model.middle_block.0.extra.weight"] = torch.zeros(3)
        sd["conditioner.embedders.0.transformer.text_model.extra.bias"] = torch.zeros(3)
    _raises(_variant(tiny, tmp_path, "extra.safetensors", add), "1 unexpected key(s)",
            "model.diffusion_model.middle_block.0.extra.weight")

    def add_te2(sd):
        sd["conditioner.embedders.1.model.mystery"] = torch.zeros(3)
    _raises(_variant(tiny, tmp_path, "extra2.safetensors", add_te2), "unexpected", "embedders.1.model.mystery")


def test_error_shape_mismatch(tiny, tmp_path):
    def bad(sd):
        sd["model.diffusion_model.time_embed.2.bias"] = torch.zeros(5)
    _raises(_variant(tiny, tmp_path, "shape.safetensors", bad), "shape mismatch",
            "model.diffusion_model.time_embed.2.bias", "[5]", "[128]")

    def bad_proj(sd):
        sd["conditioner.embedders.1.model.text_projection"] = torch.zeros(24, 40)
    _raises(_variant(tiny, tmp_path, "shape2.safetensors", bad_proj), "shape mismatch",
            "text_projection", "file [24, 40]", "model expects [40, 40]")


def test_error_head_width(tiny):
    with pytest.raises(UserError, match="head width 64"):
        load_models_from_sdxl_checkpoint(tiny["sai"])  # tiny widths are not multiples of 64


def test_run_main_exit_status(tiny, tmp_path):
    """A UserError from the loader ends a script with one line on stderr and exit status 2."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, %r); import library\n"
            "from library.device_utils import run_main\n"
            "from library.sdxl_model_util import load_models_from_sdxl_checkpoint\n"
            "run_main(lambda: load_models_from_sdxl_checkpoint(%r))\n") % (root, str(tmp_path / "x.safetensors"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "not found" in lines[0]


def test_failed_save_leaves_no_file(tiny, tmp_path):
    te1, te2, vae, unet, logit_scale, info = load_models_from_sdxl_checkpoint(tiny["sai"], head_dim=H.HEAD_DIM)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(UserError):
        save_stable_diffusion_checkpoint(str(out), te1, te2, unet, 0, 0, info, vae, logit_scale, None,
                                         save_dtype="fp8")
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="extension"):
        save_stable_diffusion_checkpoint(str(tmp_path / "x.pt"), te1, te2, unet, 0, 0, info, vae, logit_scale, None)
