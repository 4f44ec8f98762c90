"""LoRA file metadata as kohya writes it: ``ss_*`` training keys, the hashes
that sd-webui-additional-networks reads (``sshs_model_hash``,
``sshs_legacy_hash``) and Stability AI's ModelSpec (``modelspec.*``) keys.

The hash functions follow kohya's ``library/train_util.py``:
``precalculate_safetensors_hashes`` serialises the tensors with only the
``ss_*`` metadata, then ``addnet_hash_safetensors`` is the sha256 of the bytes
after the header and ``addnet_hash_legacy`` the first 8 hex digits of the
sha256 of the 64 KiB at offset 1 MiB (of the whole serialised file). The
ModelSpec keys follow kohya's ``library/sai_model_spec.py`` (spec 1.0.1).
"""
import datetime
import hashlib
import json
import os
import subprocess
import time
from io import BytesIO

from library.device_utils import UserError
from library.lora_file import serialize_safetensors

SS_METADATA_KEY_V2 = "ss_v2"
SS_METADATA_KEY_BASE_MODEL_VERSION = "ss_base_model_version"
SS_METADATA_KEY_NETWORK_MODULE = "ss_network_module"
SS_METADATA_KEY_NETWORK_DIM = "ss_network_dim"
SS_METADATA_KEY_NETWORK_ALPHA = "ss_network_alpha"
SS_METADATA_KEY_NETWORK_ARGS = "ss_network_args"
SS_METADATA_MINIMUM_KEYS = [
    SS_METADATA_KEY_V2, SS_METADATA_KEY_BASE_MODEL_VERSION, SS_METADATA_KEY_NETWORK_MODULE,
    SS_METADATA_KEY_NETWORK_DIM, SS_METADATA_KEY_NETWORK_ALPHA, SS_METADATA_KEY_NETWORK_ARGS,
]

# kohya's model_version string for SDXL (sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0)
MODEL_VERSION_SDXL_BASE_V1_0 = "sdxl_base_v1-0"

# ---------------------------------------------------------------------------
# hashes (kohya train_util)


def model_hash(filename):
    """Old model hash used by stable-diffusion-webui (8 hex digits of the 64 KiB at 1 MiB)."""
    try:
        with open(filename, "rb") as f:
            m = hashlib.sha256()
            f.seek(0x100000)
            m.update(f.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"
    except (IsADirectoryError, PermissionError):
        return "IsADirectory"


def calculate_sha256(filename):
    """New model hash used by stable-diffusion-webui (sha256 of the whole file)."""
    try:
        h = hashlib.sha256()
        with open(filename, "rb") as f:
            for chunk in iter(lambda: f.read(1024 * 1024), b""):
                h.update(chunk)
        return h.hexdigest()
    except FileNotFoundError:
        return "NOFILE"
    except (IsADirectoryError, PermissionError):
        return "IsADirectory"


def addnet_hash_legacy(b):
    """Old hash of sd-webui-additional-networks for .safetensors (on a BytesIO of the file)."""
    m = hashlib.sha256()
    b.seek(0x100000)
    m.update(b.read(0x10000))
    return m.hexdigest()[0:8]


def addnet_hash_safetensors(b):
    """New hash of sd-webui-additional-networks: sha256 of the tensor data after the header."""
    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        h.update(chunk)
    return h.hexdigest()


def precalculate_safetensors_hashes(tensors, metadata, dtypes=None):
    """(model_hash, legacy_hash) of ``tensors`` as kohya computes them before saving:
    only the immutable ``ss_*`` training metadata takes part."""
    ss = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    b = BytesIO(serialize_safetensors(tensors, ss, dtypes))
    return addnet_hash_safetensors(b), addnet_hash_legacy(b)


def get_git_revision_hash():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL, timeout=5).decode("ascii").strip()
    except Exception:  # noqa: BLE001  (no git, not a checkout)
        return "(unknown)"


# ---------------------------------------------------------------------------
# ss_* training metadata


def build_minimum_network_metadata(v2, base_model, network_module, network_dim, network_alpha, network_args):
    """kohya's minimum metadata (what ``--no_metadata`` keeps)."""
    metadata = {
        SS_METADATA_KEY_NETWORK_MODULE: network_module,
        SS_METADATA_KEY_NETWORK_DIM: network_dim,
        SS_METADATA_KEY_NETWORK_ALPHA: network_alpha,
    }
    if v2 is not None:
        metadata[SS_METADATA_KEY_V2] = v2
    if base_model is not None:
        metadata[SS_METADATA_KEY_BASE_MODEL_VERSION] = base_model
    if network_args is not None:
        metadata[SS_METADATA_KEY_NETWORK_ARGS] = json.dumps(network_args)
    return metadata


# args attribute -> ss_ key, as kohya's train_network.py writes them (value str()-ed; None -> "None")
_ARG_KEYS = (
    ("output_name", "ss_output_name"), ("learning_rate", "ss_learning_rate"), ("unet_lr", "ss_unet_lr"),
    ("gradient_checkpointing", "ss_gradient_checkpointing"),
    ("gradient_accumulation_steps", "ss_gradient_accumulation_steps"),
    ("max_train_steps", "ss_max_train_steps"), ("lr_warmup_steps", "ss_lr_warmup_steps"),
    ("lr_scheduler", "ss_lr_scheduler"), ("network_module", "ss_network_module"),
    ("network_dim", "ss_network_dim"), ("network_alpha", "ss_network_alpha"),
    ("network_dropout", "ss_network_dropout"), ("mixed_precision", "ss_mixed_precision"),
    ("clip_skip", "ss_clip_skip"), ("max_token_length", "ss_max_token_length"), ("seed", "ss_seed"),
    ("lowram", "ss_lowram"), ("noise_offset", "ss_noise_offset"),
    ("multires_noise_iterations", "ss_multires_noise_iterations"),
    ("multires_noise_discount", "ss_multires_noise_discount"),
    ("adaptive_noise_scale", "ss_adaptive_noise_scale"), ("zero_terminal_snr", "ss_zero_terminal_snr"),
    ("training_comment", "ss_training_comment"), ("max_grad_norm", "ss_max_grad_norm"),
    ("caption_dropout_rate", "ss_caption_dropout_rate"),
    ("caption_dropout_every_n_epochs", "ss_caption_dropout_every_n_epochs"),
    ("caption_tag_dropout_rate", "ss_caption_tag_dropout_rate"), ("face_crop_aug_range", "ss_face_crop_aug_range"),
    ("prior_loss_weight", "ss_prior_loss_weight"), ("min_snr_gamma", "ss_min_snr_gamma"),
    ("scale_weight_norms", "ss_scale_weight_norms"), ("ip_noise_gamma", "ss_ip_noise_gamma"),
    ("noise_offset_random_strength", "ss_noise_offset_random_strength"),
    ("ip_noise_gamma_random_strength", "ss_ip_noise_gamma_random_strength"),
    ("loss_type", "ss_loss_type"), ("huber_schedule", "ss_huber_schedule"), ("huber_scale", "ss_huber_scale"),
    ("huber_c", "ss_huber_c"), ("validation_seed", "ss_validation_seed"),
    ("validation_split", "ss_validation_split"), ("max_validation_steps", "ss_max_validation_steps"),
    ("validate_every_n_epochs", "ss_validate_every_n_epochs"),
    ("validate_every_n_steps", "ss_validate_every_n_steps"), ("resize_interpolation", "ss_resize_interpolation"),
)
_BOOL_ARG_KEYS = (("full_fp16", "ss_full_fp16"), ("v2", "ss_v2"), ("cache_latents", "ss_cache_latents"),
                  ("debiased_estimation_loss", "ss_debiased_estimation"), ("fp8_base", "ss_fp8_base"),
                  ("fp8_base_unet", "ss_fp8_base_unet"))


def text_encoder_lr_value(lrs):
    """``ss_text_encoder_lr``: as given (kohya writes None when unset): the number when one value (or two
    equal ones) was given, else the list."""
    if lrs is None:
        return None
    return lrs[0] if len(set(lrs)) == 1 else list(lrs)


def build_training_metadata(args, *, session_id, training_started_at, text_encoder_lr=None,
                            optimizer_name="", optimizer_args="", model_version=MODEL_VERSION_SDXL_BASE_V1_0,
                            network_kwargs=None, dataset_metadata=None):
    """kohya's ``ss_*`` training metadata from the argument namespace (train_network.py).

    ``dataset_metadata``: the dataset-derived keys the trainer computes
    (``ss_num_train_images``, ``ss_num_reg_images``, ``ss_num_batches_per_epoch``,
    ``ss_num_epochs``, ``ss_datasets`` / ``ss_tag_frequency`` / ``ss_dataset_dirs``,
    ``ss_batch_size_per_device``, ``ss_resolution``, ...); merged in as given.
    Every value is ``str()``-ed as kohya does (``None`` -> ``"None"``).
    """
    md = {"ss_session_id": session_id, "ss_training_started_at": training_started_at}
    for attr, key in _ARG_KEYS:
        md[key] = getattr(args, attr, None)
    for attr, key in _BOOL_ARG_KEYS:
        md[key] = bool(getattr(args, attr, False))
    md["ss_text_encoder_lr"] = text_encoder_lr
    md["ss_base_model_version"] = model_version
    md["ss_sd_scripts_commit_hash"] = get_git_revision_hash()
    md["ss_optimizer"] = optimizer_name + (f"({optimizer_args})" if len(optimizer_args) > 0 else "")
    if dataset_metadata:
        md.update(dataset_metadata)
    if getattr(args, "network_args", None):
        md[SS_METADATA_KEY_NETWORK_ARGS] = json.dumps(network_kwargs or {})
    for option, kind in (("pretrained_model_name_or_path", "sd_model"), ("vae", "vae")):
        name = getattr(args, option, None)
        if name is not None:  # a local file: its hashes and its base name (kohya)
            if os.path.exists(name):
                md[f"ss_{kind}_hash"] = model_hash(name)
                md[f"ss_new_{kind}_hash"] = calculate_sha256(name)
                name = os.path.basename(name)
            md[f"ss_{kind}_name"] = name
    return {k: str(v) for k, v in md.items()}


def run_metadata(args, train_group, val_group, num_batches, num_epochs, world_size):
    """The training metadata's keys that come from the run rather than an argument (those are
    ``_ARG_KEYS``): image counts, batches per epoch, epochs, batch sizes, and ``dataset_metadata``'s keys;
    the ``dataset_metadata`` argument of ``build_training_metadata``."""
    total_batch_size = args.train_batch_size * world_size * args.gradient_accumulation_steps
    md = {"ss_num_train_images": sum(d.num_train_images for d in train_group.datasets),
          "ss_num_reg_images": sum(d.num_reg_images for d in train_group.datasets),
          "ss_num_batches_per_epoch": num_batches, "ss_num_epochs": num_epochs,
          "ss_batch_size_per_device": args.train_batch_size, "ss_total_batch_size": total_batch_size,
          "ss_num_validation_images": sum(d.num_train_images for d in val_group.datasets) if val_group else 0}
    md.update(dataset_metadata(args, train_group, total_batch_size))
    return md


def dataset_metadata(args, group, total_batch_size):
    """kohya's dataset keys of the training metadata: with a dataset ``.toml`` ``ss_datasets`` (each
    dataset and its subsets), ``ss_tag_frequency`` and ``ss_dataset_dirs`` (JSON); from command-line
    folders the flat ``ss_resolution`` ... ``ss_bucket_info`` keys (train_network.py's two branches)."""
    from library.dataset_dreambooth import DreamBoothDataset

    def dirs_entry(subset):
        return {"n_repeats": subset.num_repeats, "img_count": subset.img_count}

    if getattr(args, "dataset_config", None) is not None:
        datasets, tag_frequency, dirs = [], {}, {}
        for dataset in group.datasets:
            dreambooth = isinstance(dataset, DreamBoothDataset)
            subsets = []
            for subset in dataset.subsets:
                sm = {"img_count": subset.img_count, "num_repeats": subset.num_repeats,
                      "color_aug": bool(subset.color_aug), "flip_aug": bool(subset.flip_aug),
                      "random_crop": bool(subset.random_crop), "shuffle_caption": bool(subset.shuffle_caption),
                      "keep_tokens": subset.keep_tokens, "keep_tokens_separator": subset.keep_tokens_separator,
                      "secondary_separator": subset.secondary_separator,
                      "enable_wildcard": bool(subset.enable_wildcard), "caption_prefix": subset.caption_prefix,
                      "caption_suffix": subset.caption_suffix}
                dir_name = None
                if subset.image_dir:
                    sm["image_dir"] = dir_name = os.path.basename(subset.image_dir)
                if dreambooth:
                    sm["class_tokens"] = subset.class_tokens
                    sm["is_reg"] = subset.is_reg
                    if subset.is_reg:
                        dir_name = None  # regularization folders are not listed
                else:
                    sm["metadata_file"] = dir_name = os.path.basename(subset.metadata_file)
                subsets.append(sm)
                if dir_name is not None:
                    name, i = dir_name, 2
                    while name in dirs:  # the same folder in several datasets
                        name, i = f"{dir_name} ({i})", i + 1
                    dirs[name] = dirs_entry(subset)
            datasets.append({"is_dreambooth": dreambooth, "batch_size_per_device": dataset.batch_size,
                             "num_train_images": dataset.num_train_images, "num_reg_images": dataset.num_reg_images,
                             "resolution": (dataset.width, dataset.height), "enable_bucket": bool(dataset.enable_bucket),
                             "min_bucket_reso": dataset.min_bucket_reso, "max_bucket_reso": dataset.max_bucket_reso,
                             "tag_frequency": dataset.tag_frequency, "bucket_info": dataset.bucket_info,
                             "subsets": subsets})
            for dir_name, freq in dataset.tag_frequency.items():
                tag_frequency.setdefault(dir_name, freq)  # a folder in several datasets counts once
        return {"ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(tag_frequency),
                "ss_dataset_dirs": json.dumps(dirs)}
    dataset = group.datasets[0]
    dirs, reg_dirs = {}, {}
    for subset in dataset.subsets:
        if getattr(args, "in_json", None) is None:
            (reg_dirs if subset.is_reg else dirs)[os.path.basename(subset.image_dir)] = dirs_entry(subset)
        else:
            dirs[os.path.basename(subset.metadata_file)] = dirs_entry(subset)
    return {"ss_batch_size_per_device": args.train_batch_size, "ss_total_batch_size": total_batch_size,
            "ss_resolution": args.resolution, "ss_color_aug": bool(args.color_aug), "ss_flip_aug": bool(args.flip_aug),
            "ss_random_crop": bool(args.random_crop), "ss_shuffle_caption": bool(args.shuffle_caption),
            "ss_enable_bucket": bool(dataset.enable_bucket), "ss_bucket_no_upscale": bool(dataset.bucket_no_upscale),
            "ss_min_bucket_reso": dataset.min_bucket_reso, "ss_max_bucket_reso": dataset.max_bucket_reso,
            "ss_keep_tokens": args.keep_tokens, "ss_dataset_dirs": json.dumps(dirs),
            "ss_reg_dataset_dirs": json.dumps(reg_dirs), "ss_tag_frequency": json.dumps(dataset.tag_frequency),
            "ss_bucket_info": json.dumps(dataset.bucket_info)}


def minimum_metadata(metadata):
    return {k: metadata[k] for k in SS_METADATA_MINIMUM_KEYS if k in metadata}


# ---------------------------------------------------------------------------
# ModelSpec (kohya sai_model_spec.py, spec 1.0.1)

MODELSPEC_VERSION = "1.0.1"
ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base"
ADAPTER_LORA = "lora"
ADAPTER_TEXTUAL_INVERSION = "textual-inversion"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
PRED_TYPE_EPSILON = "epsilon"
PRED_TYPE_V = "v"
IMPLEMENTATION_PREFIX = "sd-scripts-mindspore"

_STANDARD_FIELDS = ("title", "author", "description", "license", "tags")


def get_implementation_version():
    rev = get_git_revision_hash()
    return f"{IMPLEMENTATION_PREFIX}/{'unknown' if rev == '(unknown)' else rev}"


def _resolution(reso, sdxl, v2, v_parameterization):
    if reso is not None:
        if isinstance(reso, str):
            reso = tuple(int(r) for r in reso.split(","))
        if isinstance(reso, int):
            reso = (reso, reso)
        if len(reso) == 1:
            reso = (reso[0], reso[0])
    elif sdxl:
        reso = (1024, 1024)
    elif v2 and v_parameterization:
        reso = (768, 768)
    else:
        reso = (512, 512)
    return f"{reso[0]}x{reso[1]}"


def build_modelspec_metadata(*, v2=False, v_parameterization=False, sdxl=True, lora=True, textual_inversion=False,
                             timestamp=None, title=None, reso=None, author=None, description=None, license=None,
                             tags=None, merged_from=None, timesteps=None, clip_skip=None, optional_metadata=None):
    """``modelspec.*`` keys as kohya's ``sai_model_spec.build_metadata`` (None-valued fields left out)."""
    timestamp = time.time() if timestamp is None else timestamp
    arch = ARCH_SD_XL_V1_BASE if sdxl else (ARCH_SD_V2_768_V if v_parameterization else ARCH_SD_V2_512) if v2 \
        else ARCH_SD_V1
    if lora:
        arch += f"/{ADAPTER_LORA}"
    elif textual_inversion:
        arch += f"/{ADAPTER_TEXTUAL_INVERSION}"
    impl = IMPL_STABILITY_AI if ((lora and sdxl) or textual_inversion or not lora) else IMPL_DIFFUSERS
    if title is None:
        title = ("LoRA" if lora else "TextualInversion" if textual_inversion else "Checkpoint") + f"@{timestamp}"
    date = datetime.datetime.fromtimestamp(int(timestamp)).isoformat()
    timestep_range = None
    if timesteps is not None:
        if isinstance(timesteps, (str, int)):
            timesteps = (timesteps, timesteps)
        if len(timesteps) == 1:
            timesteps = (timesteps[0], timesteps[0])
        timestep_range = f"{timesteps[0]},{timesteps[1]}"
    optional = dict(optional_metadata or {})
    if optional.get("thumbnail"):  # kohya stores a thumbnail file as a data URL
        optional["thumbnail"] = thumbnail_data_url(optional["thumbnail"])
    optional.setdefault("implementation_version", get_implementation_version())
    fields = {
        "architecture": arch, "implementation": impl, "title": title, "resolution": _resolution(reso, sdxl, v2,
                                                                                                 v_parameterization),
        "sai_model_spec": MODELSPEC_VERSION, "description": description, "author": author, "date": date,
        "license": license, "tags": tags, "merged_from": merged_from,
        "prediction_type": PRED_TYPE_V if v_parameterization else PRED_TYPE_EPSILON,
        "timestep_range": timestep_range, "encoder_layer": None if clip_skip is None else f"{clip_skip}",
    }
    md = {f"modelspec.{k}": str(v) for k, v in fields.items() if v is not None}
    for k, v in optional.items():
        md[k if k.startswith("modelspec.") else f"modelspec.{k}"] = str(v)
    return md


def thumbnail_data_url(value: str) -> str:
    """kohya's ``file_to_data_url`` for ``--metadata_thumbnail``: a data URL stays as given, a file becomes
    ``data:<mime>;base64,...``. kohya drops a missing file with a warning; here it is an error (checked at start
    by ``check_metadata_args``)."""
    import base64
    import mimetypes

    if value.startswith("data:"):
        return value
    if not os.path.isfile(value):
        raise UserError(f"--metadata_thumbnail {value}: file not found (give an image file or a data: URL)")
    mime = mimetypes.guess_type(value)[0] or "application/octet-stream"
    with open(value, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def check_metadata_args(args):
    """At start: a ``--metadata_thumbnail`` file must exist (it is read only when the LoRA is saved)."""
    thumbnail = getattr(args, "metadata_thumbnail", None)
    if thumbnail:
        thumbnail_data_url(thumbnail)


def get_sai_model_spec(args, sdxl=True, lora=True, textual_inversion=False, optional_metadata=None, timestamp=None):
    """kohya's ``train_util.get_sai_model_spec(None, args, ...)``: ModelSpec keys from the arguments
    (``--metadata_title/author/description/license/tags`` and any other ``--metadata_*``)."""
    title = getattr(args, "metadata_title", None)
    if title is None:
        title = getattr(args, "output_name", None)
    min_t, max_t = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    timesteps = None
    if min_t is not None or max_t is not None:
        timesteps = (min_t if min_t is not None else 0, max_t if max_t is not None else 1000)
    extra = {}
    for attr in sorted(vars(args)) if hasattr(args, "__dict__") else []:
        if attr.startswith("metadata_") and not attr.startswith("metadata___"):
            value = getattr(args, attr)
            if value is not None and attr[len("metadata_"):] not in _STANDARD_FIELDS:
                extra[attr[len("metadata_"):]] = value
    if optional_metadata:
        extra.update(optional_metadata)
    return build_modelspec_metadata(
        v2=bool(getattr(args, "v2", False)), v_parameterization=bool(getattr(args, "v_parameterization", False)),
        sdxl=sdxl, lora=lora, textual_inversion=textual_inversion, timestamp=timestamp, title=title,
        reso=getattr(args, "resolution", None), author=getattr(args, "metadata_author", None),
        description=getattr(args, "metadata_description", None), license=getattr(args, "metadata_license", None),
        tags=getattr(args, "metadata_tags", None), timesteps=timesteps, clip_skip=getattr(args, "clip_skip", None),
        optional_metadata=extra or None)
