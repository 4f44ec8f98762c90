"""Test helpers: a tiny SDXL-topology model in torch (diffusers UNet/VAE, transformers CLIP),
written as a diffusers folder and as an SAI single file with the test's own key map
(independent of library.sdxl_checkpoint_keys), plus torch reference outputs."""
import json
import os
import re

import numpy as np
import torch

TIME_DIM = 8
TE1 = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=998,
           eos_token_id=2, pad_token_id=1)
TE2 = dict(vocab_size=1000, hidden_size=40, intermediate_size=80, num_hidden_layers=4, num_attention_heads=5,
           max_position_embeddings=77, hidden_act="gelu", projection_dim=24, bos_token_id=998,
           eos_token_id=999, pad_token_id=1)
CONTEXT_DIM = TE1["hidden_size"] + TE2["hidden_size"]
HEAD_DIM = 8


def unet_kwargs(levels=(1, 2, 4), mc=32, depth=(0, 1, 2), res=2, head_dim=HEAD_DIM, pooled=24,
                time_dim=TIME_DIM, context_dim=CONTEXT_DIM):
    chans = tuple(mc * m for m in levels)
    return dict(
        in_channels=4, out_channels=4, block_out_channels=chans, layers_per_block=res,
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)),
        attention_head_dim=tuple(c // head_dim for c in chans),
        transformer_layers_per_block=tuple(max(d, 1) for d in depth),
        cross_attention_dim=context_dim, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim, norm_num_groups=32)


VAE_KWARGS = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=4, norm_num_groups=32, scaling_factor=0.13025)


def randomize(model, seed):
    """Random weights everywhere, norms and biases included, at scales that keep activations O(1) so that
    errors anywhere show up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * n)
            elif name.endswith("bias"):
                p.copy_(0.1 * n)
            elif "embedding" in name:
                p.copy_(0.5 * n)
            elif p.dim() >= 2:
                p.copy_(n / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(n)


def build_torch_models(seed=0):
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs()).eval()
    vae = AutoencoderKL(**VAE_KWARGS).eval()
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TE1, attn_implementation="eager")).eval()
    te2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TE2, attn_implementation="eager")).eval()
    for i, m in enumerate((unet, vae, te1, te2)):
        randomize(m, seed + i)
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2)


def save_diffusers_folder(models, folder):
    for part, model in models.items():
        model.save_pretrained(os.path.join(folder, part), safe_serialization=True)


# -- the test's own SAI key map -----------------------------------------------------


def _unet_to_sgm_map(levels, res, up_attn):
    """diffusers prefix -> SGM prefix (written out here, as kohya's make_unet_conversion_map)."""
    m = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
         ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
         ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    resnet = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
              ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]
    layer = []
    for i in range(levels):
        for j in range(res):
            layer.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(res + 1) * i + j + 1}.0.", True))
            layer.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(res + 1) * i + j + 1}.1.", False))
        for j in range(res + 1):
            layer.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(res + 1) * i + j}.0.", True))
            layer.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(res + 1) * i + j}.1.", False))
        if i < levels - 1:
            layer.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(res + 1) * (i + 1)}.0.op.", False))
            slot = 2 if up_attn[i] else 1
            layer.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(res + 1) * i + res}.{slot}.", False))
    layer.append(("mid_block.attentions.0.", "middle_block.1.", False))
    for j in range(2):
        layer.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True))
    for du, sgm, is_res in layer:
        if is_res:
            m += [(du + a, sgm + b) for a, b in resnet]
        else:
            m.append((du, sgm))
    return m


def unet_to_sai(sd, levels=3, res=2):
    up_attn = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd) for i in range(levels)]
    pairs = sorted(_unet_to_sgm_map(levels, res, up_attn), key=lambda p: -len(p[0]))
    out = {}
    for k, v in sd.items():
        for du, sgm in pairs:
            if k.startswith(du):
                out["model.diffusion_model." + sgm + k[len(du):]] = v
                break
        else:
            raise KeyError(k)
    return out


def te2_to_sai(sd):
    p = "conditioner.embedders.1.model."
    out = {}
    for k, v in sd.items():
        if k == "text_projection.weight":
            out[p + "text_projection"] = v.T.contiguous()  # OpenCLIP stores P = W.T
            continue
        if k.endswith("position_ids"):
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", k)
        if m:
            rest = m.group(2)
            if re.match(r"self_attn\.[qkv]_proj\.", rest):
                if rest.startswith("self_attn.q_proj."):
                    kind = rest.rsplit(".", 1)[1]
                    base = f"text_model.encoder.layers.{m.group(1)}.self_attn."
                    out[f"{p}transformer.resblocks.{m.group(1)}.attn.in_proj_{kind}"] = torch.cat(
                        [sd[f"{base}{x}_proj.{kind}"] for x in "qkv"])
                continue
            rest = (rest.replace("layer_norm1.", "ln_1.").replace("layer_norm2.", "ln_2.")
                    .replace("self_attn.out_proj.", "attn.out_proj.").replace("mlp.fc1.", "mlp.c_fc.")
                    .replace("mlp.fc2.", "mlp.c_proj."))
            out[f"{p}transformer.resblocks.{m.group(1)}.{rest}"] = v
            continue
        name = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias"}[k]
        out[p + name] = v
    out[p + "logit_scale"] = torch.tensor(4.6052)
    return out


def vae_to_sai(sd, levels=2, attention_as_conv=True):
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", n)
        n = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", n)
        n = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.", n)
        n = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.upsample.", n)
        n = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", n)
        n = (n.replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
             .replace("mid_block.attentions.0.to_q.", "mid.attn_1.q.")
             .replace("mid_block.attentions.0.to_k.", "mid.attn_1.k.")
             .replace("mid_block.attentions.0.to_v.", "mid.attn_1.v.")
             .replace("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out.")
             .replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out."))
        if attention_as_conv and re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", n):
            v = v.reshape(*v.shape, 1, 1)
        out["first_stage_model." + n] = v
    return out


def sai_state_dict(models, attention_as_conv=True, position_ids=True):
    sd = {}
    sd.update(unet_to_sai(models["unet"].state_dict()))
    te1 = {"conditioner.embedders.0.transformer." + k: v for k, v in models["text_encoder"].state_dict().items()}
    if position_ids:
        te1["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = \
            torch.arange(77, dtype=torch.int64)[None]
    sd.update(te1)
    sd.update(te2_to_sai(models["text_encoder_2"].state_dict()))
    sd.update(vae_to_sai(models["vae"].state_dict(), attention_as_conv=attention_as_conv))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_sai_file(sd, path, dtype=None):
    import safetensors.torch

    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    safetensors.torch.save_file(sd, path)


# -- inputs and torch references -------------------------------------------------------


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids1 = np.full((2, 77), 999, np.int64)   # TE1 style: padded with EOS
    ids2 = np.zeros((2, 77), np.int64)       # TE2 style: padded with "!" = 0
    for row, n in enumerate((5, 30)):
        text = rng.integers(1, 998, n)
        for ids in (ids1, ids2):
            ids[row, 0] = 998
            ids[row, 1:n + 1] = text
            ids[row, n + 1] = 999
    time_ids = np.array([[64, 64, 0, 0, 64, 64], [48, 32, 4, 2, 40, 40]], np.float32)
    return dict(ids1=ids1, ids2=ids2,
                x=rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
                t=np.array([999.0, 17.0], np.float32),
                context=rng.standard_normal((2, 7, CONTEXT_DIM)).astype(np.float32),
                pooled=rng.standard_normal((2, TE2["projection_dim"])).astype(np.float32),
                time_ids=time_ids,
                image=np.clip(rng.standard_normal((1, 3, 32, 32)), -1, 1).astype(np.float32))


@torch.no_grad()
def torch_outputs(models, inp):
    te1 = models["text_encoder"](torch.tensor(inp["ids1"]), output_hidden_states=True)
    te2 = models["text_encoder_2"](torch.tensor(inp["ids2"]), output_hidden_states=True)
    unet = models["unet"](torch.tensor(inp["x"]), torch.tensor(inp["t"]), torch.tensor(inp["context"]),
                          added_cond_kwargs={"text_embeds": torch.tensor(inp["pooled"]),
                                             "time_ids": torch.tensor(inp["time_ids"])}).sample
    post = models["vae"].encode(torch.tensor(inp["image"])).latent_dist
    dec = models["vae"].decode(post.mean).sample
    return dict(
        te1_hidden=[h.numpy() for h in te1.hidden_states], te1_last=te1.last_hidden_state.numpy(),
        te1_pooled=te1.pooler_output.numpy(),
        te2_hidden=[h.numpy() for h in te2.hidden_states], te2_last=te2.last_hidden_state.numpy(),
        te2_embeds=te2.text_embeds.numpy(),
        unet=unet.numpy(), vae_mean=post.mean.numpy(), vae_logvar=post.logvar.numpy(), vae_dec=dec.numpy())


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


# -- full-size SDXL-shaped file (slow test / bench) ----------------------------------------

SDXL_UNET_KWARGS = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, sample_size=128)
SDXL_VAE_KWARGS = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       latent_channels=4, norm_num_groups=32, scaling_factor=0.13025, sample_size=1024)
SDXL_TE1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_TE2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)


def diffusers_unet_from_sai(path, kwargs=SDXL_UNET_KWARGS):
    """diffusers' U-Net with the SAI file's U-Net weights in fp32 (read one tensor at a time, no second
    copy): (unet, {SGM parameter name: diffusers parameter name})."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from library.sdxl_model_util import convert_sdxl_unet_state_dict_to_diffusers

    with init_empty_weights():
        unet = UNet2DConditionModel(**kwargs)
    prefix = "model.diffusion_model."
    with safe_open(path, "np") as f:
        names = {k[len(prefix):]: k for k in f.keys() if k.startswith(prefix)}
        to_diffusers = convert_sdxl_unet_state_dict_to_diffusers({n: n for n in names})
        unet.load_state_dict({d: torch.from_numpy(f.get_tensor(names[k]).astype(np.float32))
                              for d, k in to_diffusers.items()}, assign=True)
    return unet, {sgm: d for d, sgm in to_diffusers.items()}


def add_lora_hook(module, down, up, scale):
    """kohya's LoRA on a torch Linear or Conv2d as a forward hook: output + up(down(x)) * scale."""
    F = torch.nn.functional
    if isinstance(module, torch.nn.Conv2d):
        def hook(mod, args, output):
            return output + F.conv2d(F.conv2d(args[0], down, stride=mod.stride, padding=mod.padding), up) * scale
    else:
        def hook(mod, args, output):
            return output + F.linear(F.linear(args[0], down), up) * scale
    return module.register_forward_hook(hook)


def full_size_meta_models():
    """SDXL-sized torch models on the meta device (shapes only, nothing allocated)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        return dict(
            unet=UNet2DConditionModel(**SDXL_UNET_KWARGS),
            vae=AutoencoderKL(**SDXL_VAE_KWARGS),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**SDXL_TE1)),
            text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**SDXL_TE2)))


def full_size_sai_shapes():
    """{SAI key: shape} of SDXL base (plus logit_scale and TE1 position_ids)."""
    models = full_size_meta_models()
    sd = {}
    sd.update(unet_to_sai(models["unet"].state_dict()))
    sd.update({"conditioner.embedders.0.transformer." + k: v
               for k, v in models["text_encoder"].state_dict().items() if not k.endswith("position_ids")})
    sd.update(te2_to_sai({k: v for k, v in models["text_encoder_2"].state_dict().items()}))
    sd.update(vae_to_sai(models["vae"].state_dict(), levels=4))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    shapes["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = (1, 77)
    return shapes


def write_full_size_sai(path, seed=0, dtype="F16"):
    """Random SDXL-shaped SAI file, streamed tensor by tensor (about 7 GB in fp16)."""
    from library import safetensors_io as sio

    rng = np.random.default_rng(seed)
    entries = []
    for key, shape in full_size_sai_shapes().items():
        if key.endswith("position_ids"):
            entries.append((key, "I64", shape, lambda: np.arange(77, dtype=np.int64)[None]))
            continue
        if key.endswith("logit_scale"):
            entries.append((key, dtype, shape, lambda: np.array(4.6052, np.float32)))
            continue

        def produce(key=key, shape=shape):
            n = rng.standard_normal(shape, dtype=np.float32)
            if ("norm" in key or "ln_" in key or "layer_norm" in key) and key.endswith("weight"):
                return 1.0 + 0.1 * n
            if key.endswith("bias") or len(shape) < 2:
                return 0.02 * n
            if "embedding" in key:
                return 0.02 * n
            fan_in = int(np.prod(shape[1:])) if not key.endswith("text_projection") else shape[0]
            n *= np.float32(1.0 / np.sqrt(fan_in))
            return n

        entries.append((key, dtype, shape, produce))
    sio.write_safetensors(path, entries)
    return path
