"""Key layouts of SDXL checkpoints and model configurations inferred from them.

Pure Python (no mindspore): maps between the names in a file and the
parameter names of our models, and reads hyper-parameters off tensor shapes.

Single-file (SAI / SGM) layout, one prefix per part:

* ``model.diffusion_model.``: the UNet; names are ``sdxl_original_unet``'s.
* ``conditioner.embedders.0.transformer.``: text encoder 1 in transformers'
  ``CLIPTextModel`` names (``text_model.*``); the buffer
  ``text_model.embeddings.position_ids`` may be present.
* ``conditioner.embedders.1.model.``: text encoder 2 in OpenCLIP names:
  ``transformer.resblocks.N.{ln_1,ln_2,attn.in_proj_weight/bias,
  attn.out_proj,mlp.c_fc,mlp.c_proj}``, ``token_embedding.weight``,
  ``positional_embedding``, ``ln_final``, ``text_projection`` (P, shape
  (width, proj): pooled = x_eos @ P, so our Linear weight is P.T) and
  ``logit_scale``. The fused q/k/v projection is split into thirds on axis 0.
* ``first_stage_model.``: the VAE in LDM names (``encoder.down.I.block.J``,
  ``mid.block_1``, ``mid.attn_1.{norm,q,k,v,proj_out}`` stored as 1x1 convs or
  as linear weights, ``decoder.up.I`` numbered bottom-up, ``norm_out``,
  ``nin_shortcut``).

A "plan" maps each model parameter to ``(file key, op)``, with op one of
``("copy",)``, ``("chunk", i, n)`` (i-th of n equal parts of axis 0) or
``("T",)`` (transpose). ``copy`` also accepts a (C, C, 1, 1) conv weight for a
(C, C) linear parameter. The save side ("entries") maps each file key to the
model parameters it is made of with ``("copy",)``, ``("cat",)`` (concatenate
q, k, v), ``("T",)`` or ``("conv",)`` (append 1x1 kernel dims).
"""
import re

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
PREFIXES = (UNET_PREFIX, TE1_PREFIX, TE2_PREFIX, VAE_PREFIX)

LOGIT_SCALE_KEY = TE2_PREFIX + "logit_scale"
TE1_POSITION_IDS_KEY = TE1_PREFIX + "text_model.embeddings.position_ids"
TE2_POSITION_IDS_KEYS = (TE2_PREFIX + "text_model.embeddings.position_ids",
                         TE2_PREFIX + "transformer.text_model.embeddings.position_ids")

DEFAULT_HEAD_DIM = 64  # SDXL's attention head width (UNet and both CLIP towers)
DEFAULT_NORM_GROUPS = 32


class LayoutError(ValueError):
    """The keys or shapes do not describe an SDXL part (turned into a UserError by callers)."""


def split_by_prefix(keys):
    """{prefix: [keys without prefix]} for the four parts, plus 'other': [full keys]."""
    out = {p: [] for p in PREFIXES}
    out["other"] = []
    for k in keys:
        for p in PREFIXES:
            if k.startswith(p):
                out[p].append(k[len(p):])
                break
        else:
            out["other"].append(k)
    return out


# ---------------------------------------------------------------------------
# text encoder 2: OpenCLIP <-> transformers names

_TE2_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_TE2_BLOCK = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")


def te2_load_plan(file_keys):
    """OpenCLIP keys (prefix removed) -> {transformers parameter: (file key, op)}.

    ``logit_scale`` and position-id buffers are not parameters and are skipped;
    keys that fit nothing are returned in the second value."""
    plan = {}
    unknown = []
    for key in file_keys:
        if key == "logit_scale" or key.endswith("position_ids"):
            continue
        if key in _TE2_TOP:
            plan[_TE2_TOP[key]] = (key, ("copy",))
            continue
        if key == "text_projection":
            plan["text_projection.weight"] = (key, ("T",))
            continue
        m = _RESBLOCK.match(key)
        if m:
            layer = f"text_model.encoder.layers.{m.group(1)}."
            rest = m.group(2)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    plan[f"{layer}self_attn.{name}.{kind}"] = (key, ("chunk", i, 3))
                continue
            for src, dst in _TE2_BLOCK.items():
                if rest.startswith(src):
                    plan[layer + dst + rest[len(src):]] = (key, ("copy",))
                    break
            else:
                unknown.append(key)
            continue
        unknown.append(key)
    return plan, unknown


def te2_save_entries(param_names):
    """transformers parameter names -> [(OpenCLIP key, [parameter names], op)]."""
    inverse_top = {v: k for k, v in _TE2_TOP.items()}
    entries = []
    fused = {}
    for name in param_names:
        if name in inverse_top:
            entries.append((inverse_top[name], [name], ("copy",)))
            continue
        if name == "text_projection.weight":
            entries.append(("text_projection", [name], ("T",)))
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", name)
        if not m:
            raise LayoutError(f"text encoder 2 parameter {name} has no OpenCLIP name")
        block = f"transformer.resblocks.{m.group(1)}."
        rest = m.group(2)
        qkv = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
        if qkv:
            key = f"{block}attn.in_proj_{qkv.group(2)}"
            if key not in fused:
                fused[key] = len(entries)
                prefix = f"text_model.encoder.layers.{m.group(1)}.self_attn."
                entries.append((key, [f"{prefix}{p}_proj.{qkv.group(2)}" for p in "qkv"], ("cat",)))
            continue
        for src, dst in _TE2_BLOCK.items():
            if rest.startswith(dst):
                entries.append((block + src + rest[len(dst):], [name], ("copy",)))
                break
        else:
            raise LayoutError(f"text encoder 2 parameter {name} has no OpenCLIP name")
    return entries


# ---------------------------------------------------------------------------
# VAE: LDM <-> diffusers names

_VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
_VAE_ATTN = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
             ("proj_out.", "to_out.0."))
# diffusers' pre-0.17 attention names, accepted on load
_VAE_OLD_ATTN = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))


def vae_num_levels_ldm(keys):
    levels = {int(m.group(1)) for m in (re.match(r"encoder\.down\.(\d+)\.", k) for k in keys) if m}
    if not levels:
        raise LayoutError("no encoder.down.* keys")
    return max(levels) + 1


def vae_num_levels_diffusers(keys):
    levels = {int(m.group(1)) for m in (re.match(r"encoder\.down_blocks\.(\d+)\.", k) for k in keys) if m}
    if not levels:
        raise LayoutError("no encoder.down_blocks.* keys")
    return max(levels) + 1


def rename_prefix(name, pairs, reverse=False):
    """``name`` with the first prefix of ``pairs`` ((a, b): a -> b, or b -> a when ``reverse``) that it starts
    with replaced; None when it starts with none."""
    for a, b in pairs:
        src, dst = (b, a) if reverse else (a, b)
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def _swap(rest, pairs, reverse):
    return rename_prefix(rest, pairs, reverse) or rest


# (LDM form, diffusers form, renames of the tail) inside encoder./decoder. Fields: {tail} the rest of the
# name, {i} an index written alike, {one} a 1-based LDM index of a 0-based diffusers one, {up} a decoder
# level, numbered bottom-up in LDM files and top-down in diffusers.
_VAE_RULES = (
    ("norm_out.{tail}", "conv_norm_out.{tail}", ()),
    ("mid.block_{one}.{tail}", "mid_block.resnets.{one}.{tail}", _VAE_RESNET),
    ("mid.attn_1.{tail}", "mid_block.attentions.0.{tail}", _VAE_ATTN),
    ("down.{i}.block.{j}.{tail}", "down_blocks.{i}.resnets.{j}.{tail}", _VAE_RESNET),
    ("up.{up}.block.{j}.{tail}", "up_blocks.{up}.resnets.{j}.{tail}", _VAE_RESNET),
    ("down.{i}.downsample.{tail}", "down_blocks.{i}.downsamplers.0.{tail}", ()),
    ("up.{up}.upsample.{tail}", "up_blocks.{up}.upsamplers.0.{tail}", ()),
)


def _form_regex(form):
    pattern = re.escape(form).replace(r"\{tail\}", "(?P<tail>.+)")
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", pattern) + "$")


_VAE_RULE_REGEX = tuple((_form_regex(ldm), _form_regex(diffusers)) for ldm, diffusers, _ in _VAE_RULES)


def _vae_rename(rest, to_diffusers, num_levels):
    """``rest`` (after encoder./decoder.) in the other layout by the first rule that fits, or None."""
    side = 0 if to_diffusers else 1
    for rule, regexes in zip(_VAE_RULES, _VAE_RULE_REGEX):
        m = regexes[side].match(rest)
        if not m:
            continue
        fields = {}
        for name, value in m.groupdict().items():
            if name == "tail":
                value = _swap(value, rule[2], not to_diffusers)
            elif name == "one":
                value = int(value) + (-1 if to_diffusers else 1)
            elif name == "up":
                value = num_levels - 1 - int(value)
            fields[name] = value
        return rule[1 - side].format(**fields)
    return None


def vae_ldm_to_diffusers(key, num_levels):
    """One LDM VAE key (prefix removed) -> diffusers name, or None when it fits nothing."""
    m = re.match(r"(encoder|decoder)\.(.+)$", key)
    if not m:
        return key if re.match(r"(post_)?quant_conv\.(weight|bias)$", key) else None
    part, rest = m.groups()
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    renamed = _vae_rename(rest, True, num_levels)
    return None if renamed is None else f"{part}.{renamed}"


def vae_diffusers_to_ldm(name, num_levels):
    """One diffusers VAE name -> LDM key (prefix not added); names that no rule fits are kept."""
    m = re.match(r"(encoder|decoder)\.(.+)$", name)
    renamed = m and _vae_rename(m.group(2), False, num_levels)
    return f"{m.group(1)}.{renamed}" if renamed else name


def is_vae_attention_weight(name):
    """diffusers VAE names of the mid attention projections (1x1 convs in LDM files)."""
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", name))


def vae_load_plan_ldm(file_keys):
    """LDM VAE keys (prefix removed) -> ({diffusers name: (file key, op)}, unknown keys)."""
    n = vae_num_levels_ldm(file_keys)
    plan = {}
    unknown = []
    for key in file_keys:
        name = vae_ldm_to_diffusers(key, n)
        if name is None:
            unknown.append(key)
        else:
            plan[name] = (key, ("copy",))
    return plan, unknown


def vae_load_plan_diffusers(file_keys):
    """diffusers VAE keys (including pre-0.17 attention names) -> plan, unknown (none)."""
    plan = {}
    for key in file_keys:
        name = key
        m = re.match(r"(.+\.mid_block\.attentions\.0\.)(.+)$", key)
        if m:
            name = m.group(1) + _swap(m.group(2), _VAE_OLD_ATTN, False)
        plan[name] = (key, ("copy",))
    return plan, []


def vae_save_entries(param_names, attention_as_conv=True):
    """diffusers VAE names -> [(LDM key, [name], op)]; mid attention weights as 1x1 convs
    (``attention_as_conv``, the SAI layout) or as linear weights."""
    n = vae_num_levels_diffusers(param_names)
    entries = []
    for name in param_names:
        op = ("conv",) if attention_as_conv and is_vae_attention_weight(name) else ("copy",)
        entries.append((vae_diffusers_to_ldm(name, n), [name], op))
    return entries


def detect_vae_layout(keys):
    """'ldm', 'diffusers' or None for a VAE state dict's keys (prefix removed)."""
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return "diffusers"
    if any(k.startswith("encoder.down.") for k in keys):
        return "ldm"
    return None


# ---------------------------------------------------------------------------
# shapes and plans


def planned_shape(src_shape, op):
    """Shape of a parameter made by ``op`` from a source of ``src_shape``."""
    src_shape = tuple(src_shape)
    if op[0] == "chunk":
        n = op[2]
        if not src_shape or src_shape[0] % n:
            return None
        return (src_shape[0] // n,) + src_shape[1:]
    if op[0] == "T":
        return tuple(reversed(src_shape))
    return src_shape


def shape_fits(src_shape, op, param_shape):
    """Whether a file tensor of ``src_shape`` makes a parameter of ``param_shape`` via ``op``."""
    got = planned_shape(src_shape, op)
    if got == tuple(param_shape):
        return True
    # a 1x1 conv weight feeding a linear weight (VAE mid attention, old proj_in/out)
    return op[0] == "copy" and got is not None and len(got) == 4 and got[2:] == (1, 1) \
        and got[:2] == tuple(param_shape)


def source_shape(param_shape, op):
    """The file shape that ``op`` expects for a parameter shape (for error messages)."""
    param_shape = tuple(param_shape)
    if op[0] == "chunk":
        return (param_shape[0] * op[2],) + param_shape[1:]
    if op[0] == "T":
        return tuple(reversed(param_shape))
    return param_shape


# ---------------------------------------------------------------------------
# configurations from shapes


def _count(keys, pattern):
    return len({m.group(1) for m in (re.match(pattern, k) for k in keys) if m})


def _need(shapes, key, what):
    if key not in shapes:
        raise LayoutError(f"{what}: key {key} is missing")
    return shapes[key]


def _heads(width, head_dim, what):
    if width % head_dim or width < head_dim:
        raise LayoutError(f"{what}: width {width} is not a multiple of the attention head width "
                          f"{head_dim} (pass head_dim= for models with another head width)")
    return width // head_dim


def infer_unet_config(shapes, head_dim=DEFAULT_HEAD_DIM, norm_num_groups=DEFAULT_NORM_GROUPS):
    """SdxlUNetConfig keyword arguments from SGM-named UNet shapes (prefix removed)."""
    keys = list(shapes)
    w = _need(shapes, "input_blocks.0.0.weight", "U-Net")
    mc, in_ch = w[0], w[1]
    out_ch = _need(shapes, "out.2.weight", "U-Net")[0]
    adm = _need(shapes, "label_emb.0.0.weight", "U-Net")[1]
    levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.weight$") + 1
    num_input = _count(keys, r"input_blocks\.(\d+)\.")
    if num_input % levels:
        raise LayoutError(f"U-Net: {num_input} input blocks do not split into {levels} levels")
    res = num_input // levels - 1
    mults, depths = [], []
    context_dim = None
    for level in range(levels):
        first = 1 + level * (res + 1)
        ch = _need(shapes, f"input_blocks.{first}.0.out_layers.3.weight", "U-Net")[0]
        if ch % mc:
            raise LayoutError(f"U-Net: level {level} width {ch} is not a multiple of {mc}")
        mults.append(ch // mc)
        depth = _count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        depths.append(depth)
        if depth:
            _heads(ch, head_dim, f"U-Net level {level}")
    middle = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    for k in keys:
        if k.endswith("attn2.to_k.weight"):
            context_dim = shapes[k][1]
            break
    kwargs = dict(in_channels=in_ch, out_channels=out_ch, model_channels=mc, channel_mult=tuple(mults),
                  num_res_blocks=res, transformer_depth=tuple(depths), transformer_depth_middle=middle,
                  num_head_channels=head_dim, adm_in_channels=adm, norm_num_groups=norm_num_groups)
    if context_dim is not None:
        kwargs["context_dim"] = context_dim
    for ch in {m * mc for m in mults}:
        if ch % norm_num_groups:
            raise LayoutError(f"U-Net: width {ch} is not divisible by {norm_num_groups} norm groups "
                              "(pass norm_num_groups=)")
    return kwargs


def infer_clip_config(shapes, head_dim=DEFAULT_HEAD_DIM, with_projection=False):
    """CLIPTextConfig size fields from transformers-named shapes."""
    keys = list(shapes)
    vocab, hidden = _need(shapes, "text_model.embeddings.token_embedding.weight", "text encoder")
    max_pos = _need(shapes, "text_model.embeddings.position_embedding.weight", "text encoder")[0]
    layers = _count(keys, r"text_model\.encoder\.layers\.(\d+)\.")
    if not layers:
        raise LayoutError("text encoder: no text_model.encoder.layers.* keys")
    inter = _need(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=_heads(hidden, head_dim, "text encoder"), max_position_embeddings=max_pos)
    if with_projection:
        cfg["projection_dim"] = _need(shapes, "text_projection.weight", "text encoder 2")[0]
    return cfg


def infer_vae_config(shapes, norm_num_groups=DEFAULT_NORM_GROUPS):
    """AutoencoderKLConfig fields from diffusers-named VAE shapes."""
    keys = list(shapes)
    n = vae_num_levels_diffusers(keys)
    chans = tuple(_need(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "VAE")[0] for i in range(n))
    for ch in set(chans):
        if ch % norm_num_groups:
            raise LayoutError(f"VAE: width {ch} is not divisible by {norm_num_groups} norm groups "
                              "(pass norm_num_groups=)")
    return dict(
        in_channels=_need(shapes, "encoder.conv_in.weight", "VAE")[1],
        out_channels=_need(shapes, "decoder.conv_out.weight", "VAE")[0],
        block_out_channels=chans,
        layers_per_block=_count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        latent_channels=_need(shapes, "decoder.conv_in.weight", "VAE")[1],
        norm_num_groups=norm_num_groups,
    )
