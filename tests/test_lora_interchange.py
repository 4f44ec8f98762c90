"""LoRA interchange with torch diffusers on a tiny SDXL-topology pipeline.

1. A LoRA trained (random up weights) and saved here loads in diffusers'
   ``StableDiffusionXLPipeline.load_lora_weights`` (its kohya-format path)
   and gives the same UNet and text-encoder outputs as our merged models.
2. A LoRA written in torch (``safetensors.torch`` / ``torch.save``) by kohya's
   naming rule alone loads here (merge and unmerged forward) and gives the
   same outputs as diffusers with it.
3. The files of the LoRA tools (networks/resize_lora.py, svd_merge_lora.py, extract_lora_from_models.py)
   load in diffusers and give the same outputs as our models with them merged.
Linear and conv (``conv_dim``) modules are both covered.
"""
import os

import numpy as np
import pytest

from conftest import assert_close  # noqa: E402  (imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from library import clip_text_model as ctm  # noqa: E402
from library import layers  # noqa: E402
from library.sdxl_model_util import convert_diffusers_unet_state_dict_to_sdxl  # noqa: E402
from library.sdxl_original_unet import SdxlUNet2DConditionModel, SdxlUNetConfig, get_size_embeddings  # noqa: E402
from networks import lora  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs the PEFT backend

TIME_DIM = 8
POOLED_DIM = 24  # = te2 projection_dim
UNET_CFG = SdxlUNetConfig(model_channels=32, num_head_channels=8, transformer_depth=(0, 1, 1),
                          context_dim=32 + 40, adm_in_channels=POOLED_DIM + 6 * TIME_DIM)
TE1_CFG = ctm.CLIPTextConfig.tiny()
TE2_CFG = ctm.CLIPTextConfig.tiny2()


def _hf_clip_config(cfg):
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.projection_dim, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, attn_implementation="eager")


def _diffusers_unet_kwargs(cfg):
    chans = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    return dict(
        in_channels=4, out_channels=4, sample_size=8,
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth)),
        block_out_channels=chans, layers_per_block=cfg.num_res_blocks,
        attention_head_dim=tuple(c // cfg.num_head_channels for c in chans),
        transformer_layers_per_block=tuple(max(d, 1) for d in cfg.transformer_depth),
        cross_attention_dim=cfg.context_dim, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=cfg.adm_in_channels,
        norm_num_groups=cfg.norm_num_groups)


@pytest.fixture(scope="module")
def base():
    """torch base models (state dicts as numpy) and inputs."""
    torch.manual_seed(0)
    du = diffusers.UNet2DConditionModel(**_diffusers_unet_kwargs(UNET_CFG)).eval()
    te1 = transformers.CLIPTextModel(_hf_clip_config(TE1_CFG)).eval()
    te2 = transformers.CLIPTextModelWithProjection(_hf_clip_config(TE2_CFG)).eval()
    with torch.no_grad():
        for m in (du, te1, te2):
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    sds = {name: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
           for name, m in (("unet", du), ("te1", te1), ("te2", te2))}
    rng = np.random.default_rng(0)
    ids1 = rng.integers(3, TE1_CFG.vocab_size - 10, size=(2, 9)).astype(np.int64)
    ids1[:, 0], ids1[:, -1] = TE1_CFG.vocab_size - 2, TE1_CFG.vocab_size - 1  # argmax pooling at the end
    ids2 = rng.integers(3, 400, size=(2, 9)).astype(np.int64)
    ids2[:, 0], ids2[:, -1] = TE2_CFG.bos_token_id, TE2_CFG.eos_token_id
    inputs = dict(
        ids1=ids1, ids2=ids2,
        x=rng.standard_normal((2, 4, 8, 8)).astype(np.float32), t=np.array([10.0, 500.0], np.float32),
        sizes=(np.array([[64, 64], [80, 48]], np.float32), np.array([[0, 0], [8, 4]], np.float32),
               np.array([[64, 64], [64, 64]], np.float32)))
    return sds, inputs


def _ours(sds):
    """Fresh MindSpore models with the base weights."""
    layers.set_init_seed(1)
    unet = SdxlUNet2DConditionModel(UNET_CFG)
    layers.load_param_dict(unet, convert_diffusers_unet_state_dict_to_sdxl(sds["unet"]))
    te1 = ctm.CLIPTextModel(TE1_CFG)
    ctm.load_clip_state_dict(te1, sds["te1"])
    te2 = ctm.CLIPTextModelWithProjection(TE2_CFG)
    ctm.load_clip_state_dict(te2, sds["te2"])
    return te1, te2, unet


def _run_ours(te1, te2, unet, inputs):
    o1 = te1(Tensor(inputs["ids1"]))
    o2 = te2(Tensor(inputs["ids2"]))
    h1, h2 = o1[-1][-2].asnumpy(), o2[-1][-2].asnumpy()
    ctx = np.concatenate([h1, h2], -1)
    pooled = o2[ctm.OUT_TEXT_EMBEDS].asnumpy()
    y = np.concatenate([pooled, get_size_embeddings(*inputs["sizes"], dim=TIME_DIM)], -1).astype(np.float32)
    eps = unet(Tensor(inputs["x"]), Tensor(inputs["t"]), Tensor(ctx), Tensor(y)).asnumpy()
    return {"te1": o1[0].asnumpy(), "te2": o2[0].asnumpy(), "pooled": pooled, "unet": eps}


def _run_diffusers(sds, inputs, lora_file):
    torch.manual_seed(0)
    du = diffusers.UNet2DConditionModel(**_diffusers_unet_kwargs(UNET_CFG)).eval()
    te1 = transformers.CLIPTextModel(_hf_clip_config(TE1_CFG)).eval()
    te2 = transformers.CLIPTextModelWithProjection(_hf_clip_config(TE2_CFG)).eval()
    for m, name in ((du, "unet"), (te1, "te1"), (te2, "te2")):
        m.load_state_dict({k: torch.from_numpy(v) for k, v in sds[name].items()})
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=None,
                                               tokenizer_2=None, unet=du, scheduler=None)
    if lora_file is not None:
        pipe.load_lora_weights(lora_file)
    with torch.no_grad():
        o1 = pipe.text_encoder(torch.from_numpy(inputs["ids1"]), output_hidden_states=True)
        o2 = pipe.text_encoder_2(torch.from_numpy(inputs["ids2"]), output_hidden_states=True)
        ctx = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
        time_ids = torch.from_numpy(np.concatenate(inputs["sizes"], -1))
        eps = pipe.unet(torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["t"]), ctx,
                        added_cond_kwargs={"text_embeds": o2.text_embeds, "time_ids": time_ids}).sample
    return {"te1": o1.last_hidden_state.numpy(), "te2": o2.last_hidden_state.numpy(),
            "pooled": o2.text_embeds.numpy(), "unet": eps.numpy()}


def _compare(ours, ref, base_out=None):
    errs = {}
    for k in ("te1", "te2", "pooled", "unet"):
        errs[k] = assert_close(ours[k], ref[k], what=k)
        if base_out is not None:  # the LoRA changes every output (the test is not vacuous)
            assert np.abs(ref[k] - base_out[k]).max() > 1e-3, f"LoRA did not change {k}"
    return errs


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)  # tiny models: PyNative avoids ~1 min of graph compilation
    yield


def test_our_lora_loads_in_diffusers(base, tmp_path):
    sds, inputs = base
    te1, te2, unet = _ours(sds)
    net = lora.create_network(1.0, 4, 2.0, None, [te1, te2], unet, conv_dim="3", conv_alpha="1.5")
    net.apply_to([te1, te2], unet)
    rng = np.random.default_rng(7)
    for m in net.loras:  # "trained": random up weights
        m.lora_up.weight.set_data(Tensor(0.2 * rng.standard_normal(m.lora_up.weight.shape).astype(np.float32)))
    path = str(tmp_path / "ours.safetensors")
    net.save_weights(path, None, {"ss_network_module": "networks.lora"})

    te1m, te2m, unetm = _ours(sds)
    merge_net, weights_sd = lora.create_network_from_weights(1.0, path, None, [te1m, te2m], unetm,
                                                             for_inference=True)
    merge_net.merge_to([te1m, te2m], unetm, weights_sd)
    merged = _run_ours(te1m, te2m, unetm, inputs)  # (unmerged == merged: test_lora_network.py)

    ref = _run_diffusers(sds, inputs, path)
    base_out = _run_diffusers(sds, inputs, None)
    errs = _compare(merged, ref, base_out)
    print("ours -> diffusers max abs err", errs)

    # kohya's between-trainings tools write files diffusers loads too: the LoRA resized by
    # networks/resize_lora.py (rank 4 -> 2, conv 3 -> 2), merged with itself by svd_merge_lora.py, and extracted
    # by extract_lora_from_models.py from SAI checkpoints of the base and of the base with the LoRA merged
    from library.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from library.sdxl_model_util import save_stable_diffusion_checkpoint
    from networks import extract_lora_from_models, resize_lora, svd_merge_lora

    outputs = {"resized": str(tmp_path / "resized.safetensors"), "svd_merged": str(tmp_path / "merged.safetensors"),
               "extracted": str(tmp_path / "extracted.safetensors")}
    resize_lora.main(["--model", path, "--save_to", outputs["resized"], "--new_rank", "2", "--new_conv_rank", "2"])
    svd_merge_lora.main(["--models", path, outputs["resized"], "--ratios", "0.5", "0.5", "--new_rank", "4",
                         "--new_conv_rank", "3", "--save_to", outputs["svd_merged"]])
    vae = AutoencoderKL(AutoencoderKLConfig.tiny())  # the SAI layout has a VAE; extract does not read it
    org, tuned = str(tmp_path / "org.safetensors"), str(tmp_path / "tuned.safetensors")
    save_stable_diffusion_checkpoint(org, *_ours(sds), 0, 0, None, vae, None, {})
    save_stable_diffusion_checkpoint(tuned, te1m, te2m, unetm, 0, 0, None, vae, None, {})
    extract_lora_from_models.main(["--sdxl", "--model_org", org, "--model_tuned", tuned, "--dim", "4",
                                   "--conv_dim", "3", "--save_to", outputs["extracted"]])
    for what, file in outputs.items():
        te1m, te2m, unetm = _ours(sds)
        merge_net, weights_sd = lora.create_network_from_weights(1.0, file, None, [te1m, te2m], unetm,
                                                                 for_inference=True)
        merge_net.merge_to([te1m, te2m], unetm, weights_sd)
        tool_out = _run_ours(te1m, te2m, unetm, inputs)
        errs = _compare(tool_out, _run_diffusers(sds, inputs, file), base_out)
        rel = np.abs(tool_out["unet"] - merged["unet"]).max() / np.abs(merged["unet"] - base_out["unet"]).max()
        print(f"{what}: ours -> diffusers max abs err {errs}; U-Net output vs the rank-4 LoRA's, relative to the "
              f"LoRA's effect: {rel:.3f}")


def _kohya_names_from_torch(sds):
    """kohya's naming rule applied to the torch models' parameter names (independent of our network code):
    UNet SGM paths of Linear layers inside transformers (+ ResBlock/Downsample/Upsample convs and Linear),
    text encoders' self_attn q/k/v/out_proj and mlp fc1/fc2."""
    sgm = convert_diffusers_unet_state_dict_to_sdxl(sds["unet"])
    names = {}
    for key, value in sgm.items():
        if not key.endswith(".weight") or value.ndim not in (2, 4):
            continue
        path = key[:-len(".weight")]
        if ".transformer_blocks." in path or path.endswith((".proj_in", ".proj_out")):
            names["lora_unet_" + path.replace(".", "_")] = value.shape
        elif any(s in path for s in ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection", ".op",
                                     "output_blocks.2.2.conv", "output_blocks.5.2.conv")):
            names["lora_unet_" + path.replace(".", "_")] = value.shape
    for prefix, sd in (("lora_te1_", sds["te1"]), ("lora_te2_", sds["te2"])):
        for key, value in sd.items():
            if key.endswith(".weight") and (".self_attn." in key or ".mlp." in key):
                names[prefix + key[:-len(".weight")].replace(".", "_")] = value.shape
    return names


def _torch_lora(sds):
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for name, shape in _kohya_names_from_torch(sds).items():
        rank = 3 if len(shape) == 4 else 4
        if len(shape) == 2:
            down, up = (rank, shape[1]), (shape[0], rank)
        else:
            down, up = (rank, shape[1], shape[2], shape[3]), (shape[0], rank, 1, 1)
        sd[name + ".lora_down.weight"] = 0.3 * torch.randn(down, generator=gen)
        sd[name + ".lora_up.weight"] = 0.3 * torch.randn(up, generator=gen)
        sd[name + ".alpha"] = torch.tensor(float(rank) / 2)
    return sd


def test_torch_made_lora_loads_here(base, tmp_path):
    sds, inputs = base
    from safetensors.torch import save_file
    sd = _torch_lora(sds)
    path = str(tmp_path / "torch_lora.safetensors")
    save_file({k: v.half() for k, v in sd.items()}, path, {"ss_network_dim": "4"})

    te1, te2, unet = _ours(sds)
    net, weights_sd = lora.create_network_from_weights(1.0, path, None, [te1, te2], unet, for_inference=True)
    assert len(net.unet_loras) + len(net.text_encoder_loras) == len(sd) // 3
    assert any(m.is_conv and m.kernel_size == 3 for m in net.unet_loras)
    net.merge_to([te1, te2], unet, weights_sd)
    merged = _run_ours(te1, te2, unet, inputs)
    ref = _run_diffusers(sds, inputs, path)
    errs = _compare(merged, ref)
    print("torch -> ours max abs err", errs)


def test_torch_pickled_bf16_lora_reads_as_safetensors(base, tmp_path):
    """torch.save()'d kohya .ckpt (bf16, read without torch) == the same LoRA as .safetensors, bit for bit."""
    sds, _ = base
    from safetensors.torch import save_file
    sd = {k: v.to(torch.bfloat16) for k, v in _torch_lora(sds).items()}
    torch.save(sd, str(tmp_path / "lora.ckpt"))
    save_file(sd, str(tmp_path / "lora.safetensors"))
    a, _, da = lora.load_lora_weights_file(str(tmp_path / "lora.ckpt"))
    b, _, db = lora.load_lora_weights_file(str(tmp_path / "lora.safetensors"))
    assert list(a) == list(sd) and set(b) == set(a)
    for k in a:
        assert da[k] == db[k] == "bf16"
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], sd[k].float().numpy())
