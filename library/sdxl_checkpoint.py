"""Load and save SDXL checkpoints (the bulk behind ``library.sdxl_model_util``).

Sources: an SAI/SGM single file (``.safetensors`` or a MindSpore ``.ckpt``
with the same keys), or a diffusers folder (``unet/``, ``text_encoder/``,
``text_encoder_2/``, ``vae/``). Model configurations come from the tensor
shapes (``library.sdxl_checkpoint_keys``), so SDXL, fine-tunes and tiny
models of the same topology load without a config file.

Memory: each model is allocated once (zeros, no random init), then every
parameter is replaced by the tensor read from the file, one tensor at a time:
the file is never held in memory as a whole and no second copy of a model
exists. Shapes and key sets are checked against the file header before any
data is read.

Text encoder 2's pooled output follows SGM/diffusers: the file's
``text_projection`` P is applied as ``x_eos @ P``, so the Linear weight is
``P.T`` (kohya applies P untransposed; see Limitations.md).
"""
import json
import logging
import os
import time
from typing import NamedTuple, Optional

import numpy as np

import library  # noqa: F401  (CPU environment before mindspore loads)
import mindspore as ms
from mindspore import Tensor

from library import layers
from library import sdxl_checkpoint_keys as K
from library import safetensors_io as sio
from library.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from library.clip_text_model import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from library.device_utils import UserError
from library.dtypes import DTYPE_ALIASES, SAFETENSORS_DTYPES
from library.sdxl_original_unet import SdxlUNet2DConditionModel, SdxlUNetConfig
from library.sdxl_unet_keys import convert_diffusers_unet_state_dict_to_sdxl

logger = logging.getLogger(__name__)


class CheckpointInfo(NamedTuple):
    """What a loaded checkpoint was. ``epoch``/``global_step`` come first, as kohya's
    ``ckpt_info`` tuple (None: the file does not record them). The other fields let
    ``save_stable_diffusion_checkpoint`` write the same layout back."""
    epoch: Optional[int] = None
    global_step: Optional[int] = None
    path: str = ""
    format: str = ""                     # safetensors | mindspore | diffusers
    vae_attention_as_conv: bool = True   # LDM mid attention stored as 1x1 convs
    te1_position_ids: Optional[np.ndarray] = None  # buffer kept for the write-back
    ignored_keys: tuple = ()             # keys outside the four SDXL parts (not loaded)


# ---------------------------------------------------------------------------
# dtypes

# every precision spelling, and --mixed_precision's "no"
_DTYPE_NAMES = {**{k: SAFETENSORS_DTYPES[v] for k, v in DTYPE_ALIASES.items()}, "no": "F32"}


def _raw_dtype(dtype):
    """ms dtype / numpy dtype / name -> safetensors dtype name (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise UserError(f"unknown precision '{dtype}': choose float, fp16 or bf16")
        return _DTYPE_NAMES[dtype.lower()]
    if dtype == ms.float32:
        return "F32"
    if dtype == ms.float16:
        return "F16"
    if dtype == ms.bfloat16:
        return "BF16"
    try:
        return sio.st_dtype_of(np.empty(0, dtype))
    except TypeError:
        raise UserError(f"unsupported precision {dtype}") from None


def _ms_dtype(dtype):
    raw = _raw_dtype(dtype)
    return {None: None, "F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}[raw]


def _cast_compute_params(model, dtype):
    """Linear/Conv parameters to ``dtype`` (norms stay fp32), before any data is loaded."""
    if dtype is None or dtype == ms.float32:
        return
    for _, cell in model.cells_and_names():
        if isinstance(cell, (layers.Linear, layers.Conv2d)):
            for p in cell.get_parameters(expand=False):
                if p.dtype != dtype:
                    p.set_dtype(dtype)


# ---------------------------------------------------------------------------
# readers


class _MultiReader:
    """Several weight files seen as one (sharded diffusers weights)."""

    def __init__(self, readers):
        self.readers = readers
        self.owner = {}
        for r in readers:
            for k in r.keys():
                self.owner[k] = r
        self.path = readers[0].path if readers else ""
        self.metadata = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for r in self.readers:
            r.close()

    def keys(self):
        return list(self.owner)

    def __contains__(self, k):
        return k in self.owner

    def shape(self, k):
        return self.owner[k].shape(k)

    def raw_dtype(self, k):
        return self.owner[k].raw_dtype(k)

    def get(self, k):
        return self.owner[k].get(k)


class _Prefixed:
    """A reader restricted to keys under a prefix, addressed without it."""

    def __init__(self, reader, prefix):
        self.reader = reader
        self.prefix = prefix
        self.path = reader.path

    def keys(self):
        n = len(self.prefix)
        return [k[n:] for k in self.reader.keys() if k.startswith(self.prefix)]

    def shape(self, k):
        return self.reader.shape(self.prefix + k)

    def raw_dtype(self, k):
        return self.reader.raw_dtype(self.prefix + k)

    def get(self, k):
        return self.reader.get(self.prefix + k)


# ---------------------------------------------------------------------------
# streaming a plan into a model


def _fmt_names(names, prefix=""):
    names = sorted(names)
    shown = ", ".join(prefix + n for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"{shown}{more}"


def _set_param(p, array):
    if p.dtype == ms.bfloat16:
        p.set_data(Tensor(np.asarray(array, np.float32), dtype=ms.bfloat16))
    else:
        p.set_data(Tensor(np.asarray(array, ms.dtype_to_nptype(p.dtype))))


def stream_into(model, plan, reader, what, file_prefix="", save_entries=None):
    """Fill every parameter of ``model`` from ``reader`` following ``plan``
    ({param name: (file key, op)}). Key sets and shapes are checked first; errors are
    one-line UserErrors naming the file keys (with ``file_prefix``)."""
    where = reader.path
    params = {p.name: p for p in model.get_parameters()}
    missing = set(params) - set(plan)
    unexpected = set(plan) - set(params)
    if missing or unexpected:
        # name the file keys: missing ones through the save-side map when there is one
        missing_keys = set(missing)
        if save_entries is not None:
            missing_keys = {k for k, names, _ in save_entries(sorted(params)) if set(names) & missing}
        unexpected_keys = {plan[n][0] for n in unexpected}
        parts = []
        if missing_keys:
            parts.append(f"{len(missing_keys)} missing key(s): {_fmt_names(missing_keys, file_prefix)}")
        if unexpected_keys:
            parts.append(f"{len(unexpected_keys)} unexpected key(s): {_fmt_names(unexpected_keys, file_prefix)}")
        raise UserError(f"{where}: {what} does not match its inferred configuration: " + "; ".join(parts))
    for name, p in params.items():
        key, op = plan[name]
        src = tuple(reader.shape(key))
        if not K.shape_fits(src, op, p.shape):
            raise UserError(f"{where}: shape mismatch for {file_prefix}{key}: file {list(src)}, "
                            f"model expects {list(K.source_shape(p.shape, op))}")
    cache_key, cache = None, None
    for name, p in params.items():
        key, op = plan[name]
        if op[0] == "chunk":
            if key != cache_key:
                cache_key, cache = key, reader.get(key)
            value = np.split(cache, op[2], axis=0)[op[1]]
        else:
            value = reader.get(key)
            if op[0] == "T":
                value = np.ascontiguousarray(value.T)
        if value.shape != tuple(p.shape):
            value = value.reshape(p.shape)
        _set_param(p, value)
        del value
    return model


# ---------------------------------------------------------------------------
# building the parts


def _empty_model(reader, infer_config, model_cls, config_cls, dtype, overrides=None):
    """The model (not initialised) of the configuration ``infer_config()`` reads off the file's shapes, with
    ``overrides`` applied, its compute weights in ``dtype``; a layout that fits no SDXL part names the file."""
    try:
        fields = infer_config()
    except K.LayoutError as e:
        raise UserError(f"{reader.path}: {e}") from None
    fields.update(overrides or {})
    with layers.skip_init():
        model = model_cls(config_cls(**fields))
    _cast_compute_params(model, dtype)
    return model


def _build_unet(reader, prefix, head_dim, norm_num_groups, dtype, unet_kwargs=None):
    shapes = {k: reader.shape(prefix + k) for k in _keys_under(reader, prefix)}
    unet = _empty_model(reader, lambda: K.infer_unet_config(shapes, head_dim, norm_num_groups),
                        SdxlUNet2DConditionModel, SdxlUNetConfig, dtype, unet_kwargs)
    plan = {k: (k, ("copy",)) for k in shapes}
    return stream_into(unet, plan, _Prefixed(reader, prefix), "the U-Net", prefix,
                       lambda names: [(n, [n], ("copy",)) for n in names])


def _keys_under(reader, prefix):
    n = len(prefix)
    return [k[n:] for k in reader.keys() if k.startswith(prefix)]


def _clip_config(shapes, role, head_dim, overrides=None):
    try:
        sizes = K.infer_clip_config(shapes, head_dim, with_projection=role == 2)
    except K.LayoutError as e:
        raise UserError(str(e)) from None
    if role == 1:
        cfg = CLIPTextConfig.sdxl_text_encoder1(**sizes)
    else:
        # EOT is the last id of the CLIP vocabulary: pool at its first position
        cfg = CLIPTextConfig.sdxl_text_encoder2(eos_token_id=sizes["vocab_size"] - 1, **sizes)
    if overrides:
        cfg = CLIPTextConfig(**{**cfg.__dict__, **overrides})
    return cfg


def _build_te1(reader, prefix, head_dim, overrides=None):
    keys = [k for k in _keys_under(reader, prefix) if k != "text_model.embeddings.position_ids"]
    shapes = {k: reader.shape(prefix + k) for k in keys}
    try:
        cfg = _clip_config(shapes, 1, head_dim, overrides)
    except UserError as e:
        raise UserError(f"{reader.path}: {e}") from None
    with layers.skip_init():
        te = CLIPTextModel(cfg)
    plan = {k: (k, ("copy",)) for k in keys}
    return stream_into(te, plan, _Prefixed(reader, prefix), "text encoder 1", prefix,
                       lambda names: [(n, [n], ("copy",)) for n in names])


def _build_te2_openclip(reader, prefix, head_dim):
    plan, unknown = K.te2_load_plan(_keys_under(reader, prefix))
    if unknown:
        raise UserError(f"{reader.path}: text encoder 2 has {len(unknown)} unexpected key(s): "
                        f"{_fmt_names(unknown, prefix)}")
    shapes = {}
    for name, (key, op) in plan.items():
        shapes[name] = K.planned_shape(reader.shape(prefix + key), op)
    try:
        cfg = _clip_config(shapes, 2, head_dim)
    except UserError as e:
        raise UserError(f"{reader.path}: {e}") from None
    with layers.skip_init():
        te = CLIPTextModelWithProjection(cfg)
    return stream_into(te, plan, _Prefixed(reader, prefix), "text encoder 2", prefix, K.te2_save_entries)


def _build_te_diffusers(reader, role, head_dim, overrides):
    keys = [k for k in reader.keys() if not k.endswith("position_ids")]
    shapes = {k: reader.shape(k) for k in keys}
    try:
        cfg = _clip_config(shapes, role, head_dim, overrides)
    except UserError as e:
        raise UserError(f"{reader.path}: {e}") from None
    with layers.skip_init():
        te = CLIPTextModel(cfg) if role == 1 else CLIPTextModelWithProjection(cfg)
    plan = {k: (k, ("copy",)) for k in keys}
    return stream_into(te, plan, reader, f"text encoder {role}", "",
                       lambda names: [(n, [n], ("copy",)) for n in names])


def _build_vae(reader, prefix, norm_num_groups, dtype, config_overrides=None):
    """VAE from keys under ``prefix`` in LDM or diffusers layout; returns (vae, attention_as_conv)."""
    keys = _keys_under(reader, prefix)
    layout = K.detect_vae_layout(keys)
    if layout is None:
        raise UserError(f"{reader.path}: no VAE weights found (expected {prefix or ''}encoder.down.* "
                        f"or {prefix or ''}encoder.down_blocks.* keys)")
    if layout == "ldm":
        plan, unknown = K.vae_load_plan_ldm(keys)
        save_entries = K.vae_save_entries
    else:
        plan, unknown = K.vae_load_plan_diffusers(keys)
        save_entries = None
    if unknown:
        raise UserError(f"{reader.path}: the VAE has {len(unknown)} unexpected key(s): {_fmt_names(unknown, prefix)}")
    shapes = {name: tuple(reader.shape(prefix + key)) for name, (key, _) in plan.items()}
    vae = _empty_model(reader, lambda: K.infer_vae_config(shapes, norm_num_groups),
                       AutoencoderKL, AutoencoderKLConfig, dtype, config_overrides)
    # an LDM file is written back as it was; diffusers weights are written in the SAI layout (1x1 convs)
    as_conv = layout == "diffusers" or any(len(s) == 4 for n, s in shapes.items() if K.is_vae_attention_weight(n))
    stream_into(vae, plan, _Prefixed(reader, prefix), "the VAE", prefix, save_entries)
    return vae, as_conv


def _scalar(reader, key):
    if key not in reader:
        return None
    return reader.get(key)


# ---------------------------------------------------------------------------
# public: loading


def load_models_from_sdxl_checkpoint(ckpt_path, dtype=None, vae_path=None, head_dim=K.DEFAULT_HEAD_DIM,
                                     norm_num_groups=K.DEFAULT_NORM_GROUPS, unet_dtype=None, with_unet=True):
    """Load an SDXL checkpoint: returns ``(text_encoder1, text_encoder2, vae, unet, logit_scale, ckpt_info)``.

    ``ckpt_path``: SAI single file (``.safetensors`` or MindSpore ``.ckpt``) or a diffusers
    folder. ``dtype`` (ms dtype or 'fp16'/'bf16'/'float'): U-Net and VAE Linear/Conv weights,
    as kohya (text encoders and norms stay fp32). ``vae_path``: a separate VAE (file in LDM or
    diffusers layout, or diffusers folder) used instead of the checkpoint's.
    ``head_dim``/``norm_num_groups``: attention head width and GroupNorm groups, which shapes
    cannot tell (SDXL: 64 and 32); diffusers folders take them from their config.json.
    ``logit_scale`` is a numpy scalar array or None; ``ckpt_info`` a ``CheckpointInfo``.
    ``unet_dtype``: the U-Net's Linear/Conv weights only (overrides ``dtype`` there), loaded straight
    into it (fp16-stored weights never exist in fp32 as a whole).
    ``with_unet=False``: the U-Net's keys are checked but not read (``unet`` is None); read it later with
    ``load_unet_from_sdxl_checkpoint``, e.g. after the text encoders that were needed only before it are freed.
    """
    start = time.time()
    ms_dtype = _ms_dtype(dtype)
    unet_ms_dtype = _ms_dtype(unet_dtype) or ms_dtype
    if not os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path}: checkpoint not found")
    if os.path.isdir(ckpt_path):
        result = _load_diffusers_folder(ckpt_path, ms_dtype, vae_path, head_dim, norm_num_groups, unet_ms_dtype,
                                        with_unet)
    else:
        result = _load_single_file(ckpt_path, ms_dtype, vae_path, head_dim, norm_num_groups, unet_ms_dtype,
                                   with_unet)
    logger.info("loaded %s in %.1f s", ckpt_path, time.time() - start)
    return result


def load_unet_from_sdxl_checkpoint(ckpt_path, dtype=None, head_dim=K.DEFAULT_HEAD_DIM,
                                   norm_num_groups=K.DEFAULT_NORM_GROUPS, unet_dtype=None):
    """Only the U-Net of an SDXL checkpoint (SAI single file or diffusers folder), as
    ``load_models_from_sdxl_checkpoint`` loads it (same ``dtype``/``unet_dtype`` meaning)."""
    start = time.time()
    unet_ms_dtype = _ms_dtype(unet_dtype) or _ms_dtype(dtype)
    if not os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path}: checkpoint not found")
    if os.path.isdir(ckpt_path):
        unet = _load_diffusers_unet(ckpt_path, head_dim, norm_num_groups, unet_ms_dtype)
    else:
        with sio.open_weights(ckpt_path) as reader:
            if not K.split_by_prefix(reader.keys())[K.UNET_PREFIX]:
                raise UserError(f"{ckpt_path}: the U-Net is missing (no {K.UNET_PREFIX}* keys)")
            unet = _build_unet(reader, K.UNET_PREFIX, head_dim, norm_num_groups, unet_ms_dtype)
    logger.info("loaded the U-Net of %s in %.1f s", ckpt_path, time.time() - start)
    return unet


def _load_single_file(path, dtype, vae_path, head_dim, norm_num_groups, unet_dtype, with_unet=True):
    with sio.open_weights(path) as reader:
        groups = K.split_by_prefix(reader.keys())
        if not groups[K.UNET_PREFIX] and not groups[K.TE1_PREFIX] and not groups[K.TE2_PREFIX]:
            raise UserError(f"{path}: not an SDXL checkpoint (no {K.UNET_PREFIX}* or conditioner.embedders.* keys; "
                            f"first keys: {_fmt_names(reader.keys()[:5])})")
        for prefix, what in ((K.UNET_PREFIX, "U-Net"), (K.TE1_PREFIX, "text encoder 1"),
                             (K.TE2_PREFIX, "text encoder 2")):
            if not groups[prefix]:
                raise UserError(f"{path}: the {what} is missing (no {prefix}* keys)")
        if vae_path is None and not groups[K.VAE_PREFIX]:
            raise UserError(f"{path}: the VAE is missing (no {K.VAE_PREFIX}* keys); pass a separate VAE")
        ignored = tuple(sorted(groups["other"]))
        if ignored:
            logger.warning("%s: %d key(s) outside the SDXL parts are ignored: %s", path, len(ignored),
                           _fmt_names(ignored))
        unet = None
        if with_unet:
            logger.info("loading U-Net")
            unet = _build_unet(reader, K.UNET_PREFIX, head_dim, norm_num_groups, unet_dtype)
        logger.info("loading text encoders")
        te1 = _build_te1(reader, K.TE1_PREFIX, head_dim)
        te2 = _build_te2_openclip(reader, K.TE2_PREFIX, head_dim)
        logit_scale = _scalar(reader, K.LOGIT_SCALE_KEY)
        position_ids = _scalar(reader, K.TE1_POSITION_IDS_KEY)
        if vae_path is None:
            logger.info("loading VAE")
            vae, as_conv = _build_vae(reader, K.VAE_PREFIX, norm_num_groups, dtype)
        fmt = "safetensors" if isinstance(reader, sio.SafetensorsReader) else "mindspore"
    if vae_path is not None:
        vae, as_conv = _load_vae_any(vae_path, dtype, norm_num_groups)
    info = CheckpointInfo(None, None, path, fmt, as_conv, position_ids, ignored)
    return te1, te2, vae, unet, logit_scale, info


def load_text_encoders_from_sdxl_checkpoint(ckpt_path, head_dim=K.DEFAULT_HEAD_DIM):
    """Only the two text encoders of an SDXL checkpoint (SAI single file or diffusers folder), as
    ``load_models_from_sdxl_checkpoint`` loads them: for work that needs no U-Net (caching text encoder
    outputs), which then costs neither the U-Net's memory nor its load time."""
    if not os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path}: checkpoint not found")
    if os.path.isdir(ckpt_path):
        for part in ("text_encoder", "text_encoder_2"):
            if not os.path.isdir(os.path.join(ckpt_path, part)):
                raise UserError(f"{ckpt_path}: not a diffusers SDXL folder (no {part}/ subfolder)")
        te1, te2 = _load_diffusers_text_encoders(ckpt_path, head_dim)
        return te1, te2
    with sio.open_weights(ckpt_path) as reader:
        groups = K.split_by_prefix(reader.keys())
        for prefix, what in ((K.TE1_PREFIX, "text encoder 1"), (K.TE2_PREFIX, "text encoder 2")):
            if not groups[prefix]:
                raise UserError(f"{ckpt_path}: the {what} is missing (no {prefix}* keys): not an SDXL checkpoint?")
        return _build_te1(reader, K.TE1_PREFIX, head_dim), _build_te2_openclip(reader, K.TE2_PREFIX, head_dim)


# -- diffusers folders --------------------------------------------------------


def _read_json(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (a diffusers model folder needs a config.json in each part)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None


def _open_diffusers_weights(folder):
    """Reader over a diffusers part folder's weights (single, variant or sharded safetensors)."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: folder not found")
    names = sorted(os.listdir(folder))
    for index in (n for n in names if n.endswith(".safetensors.index.json")):
        weight_map = _read_json(os.path.join(folder, index)).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        return _MultiReader([sio.open_weights(os.path.join(folder, f)) for f in files])
    singles = [n for n in names if n.endswith(".safetensors")]
    # prefer the full-precision file over variants (model.fp16.safetensors)
    preferred = [n for n in singles if n in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
    pick = preferred or singles
    if pick:
        return sio.open_weights(os.path.join(folder, pick[0]))
    ckpts = [n for n in names if n.endswith(".ckpt")]
    if ckpts:
        return sio.open_weights(os.path.join(folder, ckpts[0]))
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    if pickles:
        sio.refuse_pickle(os.path.join(folder, pickles[0]))
    raise UserError(f"{folder}: no weights file (*.safetensors) found")


def _diffusers_unet_head_dim(cfg, default):
    chans = cfg.get("block_out_channels")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    if not chans or heads is None:
        return default
    if isinstance(heads, int):
        heads = [heads] * len(chans)
    types = cfg.get("down_block_types") or ["CrossAttnDownBlock2D"] * len(chans)
    widths = {c // h for c, h, t in zip(chans, heads, types) if "CrossAttn" in t and h}
    if len(widths) > 1:
        raise UserError(f"U-Net config: attention head width differs between levels {sorted(widths)}; "
                        "the SDXL U-Net here uses one head width")
    return widths.pop() if widths else default


def _load_diffusers_text_encoders(folder, head_dim):
    tes = []
    for role, part in ((1, "text_encoder"), (2, "text_encoder_2")):
        cfg = _read_json(os.path.join(folder, part, "config.json"))
        overrides = {k: cfg[k] for k in ("hidden_act", "layer_norm_eps", "eos_token_id", "bos_token_id",
                                         "pad_token_id") if k in cfg}
        hd = cfg["hidden_size"] // cfg["num_attention_heads"] if "num_attention_heads" in cfg \
            and "hidden_size" in cfg else head_dim
        with _open_diffusers_weights(os.path.join(folder, part)) as reader:
            tes.append(_build_te_diffusers(reader, role, hd, overrides))
    return tes


def _load_diffusers_folder(folder, dtype, vae_path, head_dim, norm_num_groups, unet_dtype, with_unet=True):
    parts = ("unet", "text_encoder", "text_encoder_2") + (() if vae_path else ("vae",))
    for part in parts:
        if not os.path.isdir(os.path.join(folder, part)):
            raise UserError(f"{folder}: not a diffusers SDXL folder (no {part}/ subfolder)")
    unet = _load_diffusers_unet(folder, head_dim, norm_num_groups, unet_dtype) if with_unet else None
    tes = _load_diffusers_text_encoders(folder, head_dim)

    if vae_path is not None:
        vae, as_conv = _load_vae_any(vae_path, dtype, norm_num_groups)
    else:
        vae, as_conv = _load_vae_any(os.path.join(folder, "vae"), dtype, norm_num_groups)
    info = CheckpointInfo(None, None, folder, "diffusers", as_conv, None, ())
    return tes[0], tes[1], vae, unet, None, info


def _load_diffusers_unet(folder, head_dim, norm_num_groups, unet_dtype):
    """U-Net: names converted to the SGM layout, then the same path as single files."""
    ucfg = _read_json(os.path.join(folder, "unet", "config.json"))
    with _open_diffusers_weights(os.path.join(folder, "unet")) as reader:
        try:
            to_sgm = convert_diffusers_unet_state_dict_to_sdxl({k: k for k in reader.keys()})
        except ValueError as e:
            raise UserError(f"{reader.path}: {e}") from None
        shapes = {sgm: reader.shape(du) for sgm, du in to_sgm.items()}
        hd = _diffusers_unet_head_dim(ucfg, head_dim)
        groups = ucfg.get("norm_num_groups", norm_num_groups)
        unet = _empty_model(reader, lambda: K.infer_unet_config(shapes, hd, groups),
                            SdxlUNet2DConditionModel, SdxlUNetConfig, unet_dtype)
        plan = {sgm: (du, ("copy",)) for sgm, du in to_sgm.items()}
        stream_into(unet, plan, reader, "the U-Net", "", None)
    return unet


# -- VAE ------------------------------------------------------------------------


def _load_vae_any(vae_path, dtype, norm_num_groups=K.DEFAULT_NORM_GROUPS):
    """A VAE from a file (LDM or diffusers keys, with or without ``first_stage_model.``),
    a diffusers VAE folder, or a diffusers model folder with ``vae/``."""
    if not os.path.exists(vae_path):
        raise UserError(f"{vae_path}: VAE not found")
    overrides = {}
    if os.path.isdir(vae_path):
        folder = vae_path
        if not os.path.exists(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, "vae")):
            folder = os.path.join(folder, "vae")
        cfg = _read_json(os.path.join(folder, "config.json"))
        norm_num_groups = cfg.get("norm_num_groups", norm_num_groups)
        if "scaling_factor" in cfg:
            overrides["scaling_factor"] = cfg["scaling_factor"]
        reader = _open_diffusers_weights(folder)
    else:
        reader = sio.open_weights(vae_path)
    with reader:
        keys = reader.keys()
        prefix = K.VAE_PREFIX if any(k.startswith(K.VAE_PREFIX) for k in keys) else ""
        return _build_vae(reader, prefix, norm_num_groups, dtype, overrides)


def load_vae(vae_id, dtype=None, norm_num_groups=K.DEFAULT_NORM_GROUPS):
    """kohya's ``model_util.load_vae``: a VAE file or diffusers folder -> AutoencoderKL."""
    return _load_vae_any(vae_id, _ms_dtype(dtype), norm_num_groups)[0]


# ---------------------------------------------------------------------------
# public: saving


def _param_array(p):
    if p.dtype == ms.bfloat16:
        return p.astype(ms.float32).asnumpy()
    return p.asnumpy()


def _entry(key, params, names, op, raw):
    """(key, raw dtype, shape, producer) for one file tensor made of model parameters."""
    ps = [params[n] for n in names]
    shape = tuple(ps[0].shape)
    if op[0] == "cat":
        shape = (sum(p.shape[0] for p in ps),) + tuple(ps[0].shape[1:])
    elif op[0] == "T":
        shape = tuple(reversed(shape))
    elif op[0] == "conv":
        shape = shape + (1, 1)
    if raw is None:
        raw = _raw_dtype(ps[0].dtype)

    def produce():
        if op[0] == "cat":
            return np.concatenate([_param_array(p) for p in ps], axis=0)
        value = _param_array(ps[0])
        if op[0] == "T":
            return np.ascontiguousarray(value.T)
        if op[0] == "conv":
            return value.reshape(shape)
        return value

    return (key, raw, shape, produce)


def _model_params(model):
    return {p.name: p for p in model.get_parameters()}


def sdxl_checkpoint_entries(text_encoder1, text_encoder2, unet, vae, logit_scale, ckpt_info=None, save_dtype=None):
    """Write plan of an SAI single file: [(key, raw dtype, shape, producer)]."""
    raw = _raw_dtype(save_dtype)
    entries = []
    params = _model_params(unet)
    entries += [_entry(K.UNET_PREFIX + n, params, [n], ("copy",), raw) for n in params]
    params = _model_params(text_encoder1)
    entries += [_entry(K.TE1_PREFIX + n, params, [n], ("copy",), raw) for n in params]
    position_ids = getattr(ckpt_info, "te1_position_ids", None)
    if position_ids is not None:
        ids = np.asarray(position_ids)
        entries.append((K.TE1_POSITION_IDS_KEY, sio.st_dtype_of(ids) if ids.dtype.kind in "iub" else
                        (raw or sio.st_dtype_of(ids)), ids.shape, lambda: ids))
    params = _model_params(text_encoder2)
    entries += [_entry(K.TE2_PREFIX + k, params, names, op, raw) for k, names, op in K.te2_save_entries(params)]
    if logit_scale is not None:
        ls = logit_scale.asnumpy() if isinstance(logit_scale, Tensor) else np.asarray(logit_scale)
        if ls.dtype.kind != "f":
            ls = ls.astype(np.float32)
        entries.append((K.LOGIT_SCALE_KEY, raw or sio.st_dtype_of(ls), ls.shape, lambda: ls))
    params = _model_params(vae)
    as_conv = getattr(ckpt_info, "vae_attention_as_conv", True)
    entries += [_entry(K.VAE_PREFIX + k, params, names, op, raw)
                for k, names, op in K.vae_save_entries(params, as_conv)]
    return entries


def save_stable_diffusion_checkpoint(output_file, text_encoder1, text_encoder2, unet, epochs, steps, ckpt_info,
                                     vae, logit_scale, metadata, save_dtype=None):
    """kohya's SDXL ``save_stable_diffusion_checkpoint``: write the SAI single-file layout.

    ``.safetensors`` (with ``metadata``, str -> str) or a MindSpore ``.ckpt`` (same keys).
    ``save_dtype``: None (each parameter's own dtype), 'float', 'fp16', 'bf16' or an ms dtype;
    integer buffers keep their type. ``epochs``/``steps`` are not stored in either format (as
    kohya's safetensors path). Returns the number of tensors written.
    """
    del epochs, steps  # kohya stores them only in torch pickles, which are not written here
    ext = os.path.splitext(output_file)[1].lower()
    if ext not in (".safetensors", ".ckpt"):
        raise UserError(f"{output_file}: unsupported checkpoint extension '{ext}' (use .safetensors or .ckpt)")
    folder = os.path.dirname(os.path.abspath(output_file))
    if not os.path.isdir(folder):
        raise UserError(f"{output_file}: output folder {folder} does not exist")
    entries = sdxl_checkpoint_entries(text_encoder1, text_encoder2, unet, vae, logit_scale, ckpt_info, save_dtype)
    if ext == ".safetensors":
        sio.write_safetensors(output_file, entries, metadata)
    else:
        if metadata:
            logger.warning("%s: a MindSpore .ckpt has no metadata section; metadata not saved", output_file)
        sio.write_ms_checkpoint(output_file, entries)
    return len(entries)
