"""Full-size SDXL checkpoint (opt-in: --runslow / RUN_SLOW=1; ~7 GB disk, ~16 GB RAM, minutes).

The test writes a random SDXL-shaped SAI file in fp16 (2515 tensors, 3.47 B parameters), loads it
with load_models_from_sdxl_checkpoint in a child process (bench/bench_sdxl_checkpoint.py: load
seconds, peak RSS, small forward outputs, fp16 save), then checks: peak RSS over the import
baseline <= 1.5x the fp32 model bytes, the save is bit-exact with an unchanged key set, and the
text encoders, VAE decoder and U-Net match diffusers/transformers loading the same file through
diffusers' single-file conversion. Set SDXL_FULL_FILE to reuse a generated file.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_close

import sdxl_checkpoint_helpers as H
from library import safetensors_io as sio

pytestmark = pytest.mark.slow


def _subset(path, prefixes):
    import safetensors

    out = {}
    with safetensors.safe_open(path, "pt") as f:
        for k in f.keys():
            if k.startswith(prefixes):
                out[k] = f.get_tensor(k).float()
    return out


def test_full_size_load_memory_roundtrip_and_parity(tmp_path):
    path = os.environ.get("SDXL_FULL_FILE") or str(tmp_path / "sdxl_random.safetensors")
    if not os.path.exists(path):
        H.write_full_size_sai(path)
    dump, resaved = str(tmp_path / "out.npz"), str(tmp_path / "resaved.safetensors")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_sdxl_checkpoint.py"),
                           "--file", path, "--dump", dump, "--save", resaved], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    print(proc.stdout)
    assert r["ratio_over_base"] <= 1.5, r

    # round trip: same keys, dtypes, shapes and bytes
    with sio.open_weights(path) as a, sio.open_weights(resaved) as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert a.raw_dtype(k) == b.raw_dtype(k) and a.shape(k) == b.shape(k), k
            assert np.array_equal(a.get_raw(k), b.get_raw(k)), k
    os.remove(resaved)

    out = dict(np.load(dump))
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    cfg = str(tmp_path / "config")
    models = H.full_size_meta_models()
    for part, model in models.items():
        os.makedirs(os.path.join(cfg, part), exist_ok=True)
        if part.startswith("text"):
            model.config.save_pretrained(os.path.join(cfg, part))
        else:
            model.save_config(os.path.join(cfg, part))
    del models
    with torch.no_grad():
        ckpt = _subset(path, ("conditioner.",))
        te1 = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, ckpt, subfolder="text_encoder",
                                                   config=cfg, local_files_only=True).float().eval()
        o1 = te1(torch.tensor(out["ids1"]), output_hidden_states=True)
        assert_close(out["te1_h11"], o1.hidden_states[11].numpy(), what="TE1 hidden_states[11]")
        assert_close(out["te1_last"], o1.last_hidden_state.numpy(), what="TE1 last")
        del te1
        te2 = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModelWithProjection, ckpt,
                                                   subfolder="text_encoder_2", config=cfg,
                                                   local_files_only=True).float().eval()
        o2 = te2(torch.tensor(out["ids2"]), output_hidden_states=True)
        assert_close(out["te2_hm2"], o2.hidden_states[-2].numpy(), what="TE2 hidden_states[-2]")
        assert_close(out["te2_embeds"], o2.text_embeds.numpy(), what="TE2 text_embeds (pooled)")
        del te2, ckpt
        vae = AutoencoderKL.from_single_file(_subset(path, ("first_stage_model.",)), config=cfg, subfolder="vae",
                                             local_files_only=True, torch_dtype=torch.float32).eval()
        assert_close(out["vae_dec"], vae.decode(torch.tensor(out["x"])).sample.numpy(), what="VAE decode")
        del vae
        unet = UNet2DConditionModel.from_single_file(_subset(path, ("model.diffusion_model.",)), config=cfg,
                                                     subfolder="unet", local_files_only=True,
                                                     torch_dtype=torch.float32).eval()
        # our y is given directly: feed diffusers the same vector through its add_embedding
        emb = unet.time_embedding(unet.time_proj(torch.tensor(out["t"])))
        aug = unet.add_embedding(torch.tensor(out["y"]))
        ref = _unet_with_emb(unet, torch.tensor(out["x"]), emb + aug, torch.tensor(out["ctx"]))
        assert_close(out["unet"], ref.numpy(), what="U-Net")


def _unet_with_emb(unet, x, emb, ctx):
    """diffusers' UNet forward with a precomputed time+added embedding (its own blocks, in order)."""
    h = unet.conv_in(x)
    res = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, r = block(hidden_states=h, temb=emb, encoder_hidden_states=ctx)
        else:
            h, r = block(hidden_states=h, temb=emb)
        res += r
    h = unet.mid_block(h, emb, encoder_hidden_states=ctx)
    for block in unet.up_blocks:
        r = res[-len(block.resnets):]
        res = res[:-len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=r, encoder_hidden_states=ctx)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=r)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
