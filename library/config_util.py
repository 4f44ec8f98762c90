"""kohya's dataset config (``--dataset_config`` .toml/.json): schema,
fallbacks and dataset construction (kohya's library/config_util.py).

Sections: ``[general]``, ``[[datasets]]`` and ``[[datasets.subsets]]``. A
value is looked up subset -> dataset -> general -> command line -> default.
Keys that a section does not accept are rejected with a UserError naming the
key and the section (kohya's voluptuous schema, with readable messages).
Without a config file the command line alone describes one dataset:
``--train_data_dir`` with ``<repeats>_<class tokens>`` sub-folders (and
``--reg_data_dir`` alike), or ``--train_data_dir`` + ``--in_json``.

With ``--masked_loss`` (kohya's ``support_controlnet``), a dataset whose
subsets all have ``conditioning_data_dir`` is a ControlNet dataset: DreamBooth
subsets whose images each have a mask image of the same file stem in that
folder (kohya's ControlNetSubset keys: no ``is_reg``, ``class_tokens`` or
``alpha_mask``). The command line's ``--conditioning_data_dir`` does not make
one (kohya's train_network.py ignores it; refused here, see train_args).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import toml

from library.dataset_dreambooth import DreamBoothDataset
from library.dataset_finetuning import FineTuningDataset
from library.dataset_group import DatasetGroup
from library.dataset_subsets import DreamBoothSubset, FineTuningSubset
from library.device_utils import UserError

logger = logging.getLogger(__name__)


def add_config_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--dataset_config", type=Path, default=None, help="config file for detail settings")


# -- parameters ------------------------------------------------------------------
@dataclass
class BaseSubsetParams:
    image_dir: Optional[str] = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: Optional[str] = None
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: Optional[Tuple[float, float]] = None
    random_crop: bool = False
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    custom_attributes: Optional[Dict[str, Any]] = None
    validation_seed: Optional[int] = None
    validation_split: float = 0.0
    resize_interpolation: Optional[str] = None


@dataclass
class DreamBoothSubsetParams(BaseSubsetParams):
    is_reg: bool = False
    class_tokens: Optional[str] = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    alpha_mask: bool = False


@dataclass
class FineTuningSubsetParams(BaseSubsetParams):
    metadata_file: Optional[str] = None
    alpha_mask: bool = False


@dataclass
class ControlNetSubsetParams(BaseSubsetParams):
    conditioning_data_dir: Optional[str] = None
    caption_extension: str = ".caption"
    cache_info: bool = False


@dataclass
class BaseDatasetParams:
    resolution: Optional[Tuple[int, int]] = None
    network_multiplier: float = 1.0
    debug_dataset: bool = False
    validation_seed: Optional[int] = None
    validation_split: float = 0.0
    resize_interpolation: Optional[str] = None


@dataclass
class _BucketedDatasetParams(BaseDatasetParams):
    """Batch and aspect-ratio bucket settings both dataset kinds share."""
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass
class DreamBoothDatasetParams(_BucketedDatasetParams):
    prior_loss_weight: float = 1.0


@dataclass
class FineTuningDatasetParams(_BucketedDatasetParams):
    pass


@dataclass
class ControlNetDatasetParams(_BucketedDatasetParams):
    pass


@dataclass
class SubsetBlueprint:
    params: Union[DreamBoothSubsetParams, FineTuningSubsetParams, ControlNetSubsetParams]


@dataclass
class DatasetBlueprint:
    is_dreambooth: bool
    params: Union[DreamBoothDatasetParams, FineTuningDatasetParams]
    subsets: Sequence[SubsetBlueprint]
    is_controlnet: bool = False


@dataclass
class DatasetGroupBlueprint:
    datasets: Sequence[DatasetBlueprint]


@dataclass
class Blueprint:
    dataset_group: DatasetGroupBlueprint


# -- validation --------------------------------------------------------------------
class _Invalid(Exception):
    pass


def _bool(v):
    if not isinstance(v, bool):
        raise _Invalid("must be true or false")
    return v


def _int(v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Invalid("must be an integer")
    return v


def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Invalid("must be a number")
    return v


def _str(v):
    if not isinstance(v, str):
        raise _Invalid("must be a string")
    return v


def _dict(v):
    if not isinstance(v, dict):
        raise _Invalid("must be a table")
    return v


def _float_pair(v):
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _Invalid("must be a list of two numbers")
    return tuple(float(_number(x)) for x in v)


def _int_or_int_pair(v):
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise _Invalid("must be an integer or a list of two integers [width, height]")
        return tuple(_int(x) for x in v)
    return (_int(v), _int(v))


class ConfigSanitizer:
    SUBSET_ASCENDABLE_SCHEMA = {
        "color_aug": _bool, "face_crop_aug_range": _float_pair, "flip_aug": _bool, "num_repeats": _int,
        "random_crop": _bool, "shuffle_caption": _bool, "keep_tokens": _int, "keep_tokens_separator": _str,
        "secondary_separator": _str, "caption_separator": _str, "enable_wildcard": _bool,
        "token_warmup_min": _int, "token_warmup_step": _number, "caption_prefix": _str, "caption_suffix": _str,
        "custom_attributes": _dict, "resize_interpolation": _str,
    }
    DO_SUBSET_ASCENDABLE_SCHEMA = {
        "caption_dropout_every_n_epochs": _int, "caption_dropout_rate": _number, "caption_tag_dropout_rate": _number,
    }
    DB_SUBSET_ASCENDABLE_SCHEMA = {"caption_extension": _str, "class_tokens": _str, "cache_info": _bool}
    DB_SUBSET_DISTINCT_SCHEMA = {"image_dir": _str, "is_reg": _bool, "alpha_mask": _bool}
    FT_SUBSET_DISTINCT_SCHEMA = {"metadata_file": _str, "image_dir": _str, "alpha_mask": _bool}
    CN_SUBSET_ASCENDABLE_SCHEMA = {"caption_extension": _str, "cache_info": _bool}
    CN_SUBSET_DISTINCT_SCHEMA = {"image_dir": _str, "conditioning_data_dir": _str}
    DATASET_ASCENDABLE_SCHEMA = {
        "batch_size": _int, "bucket_no_upscale": _bool, "bucket_reso_steps": _int, "enable_bucket": _bool,
        "max_bucket_reso": _int, "min_bucket_reso": _int, "validation_seed": _int, "validation_split": _number,
        "resolution": _int_or_int_pair, "network_multiplier": _number, "resize_interpolation": _str,
    }
    ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}

    def __init__(self, support_dreambooth: bool, support_finetuning: bool, support_controlnet: bool = False,
                 support_dropout: bool = True) -> None:
        if not (support_dreambooth or support_finetuning):
            raise ValueError("Neither DreamBooth mode nor fine tuning mode specified")
        self.support_dreambooth = support_dreambooth
        self.support_finetuning = support_finetuning
        self.support_controlnet = support_controlnet
        do = self.DO_SUBSET_ASCENDABLE_SCHEMA if support_dropout else {}
        self.db_subset_schema = {**self.SUBSET_ASCENDABLE_SCHEMA, **self.DB_SUBSET_DISTINCT_SCHEMA,
                                 **self.DB_SUBSET_ASCENDABLE_SCHEMA, **do}
        self.ft_subset_schema = {**self.SUBSET_ASCENDABLE_SCHEMA, **self.FT_SUBSET_DISTINCT_SCHEMA, **do}
        self.db_dataset_schema = {**self.DATASET_ASCENDABLE_SCHEMA, **self.SUBSET_ASCENDABLE_SCHEMA,
                                  **self.DB_SUBSET_ASCENDABLE_SCHEMA, **do}
        self.ft_dataset_schema = {**self.DATASET_ASCENDABLE_SCHEMA, **self.SUBSET_ASCENDABLE_SCHEMA, **do}
        self.cn_subset_schema = {**self.SUBSET_ASCENDABLE_SCHEMA, **self.CN_SUBSET_DISTINCT_SCHEMA,
                                 **self.CN_SUBSET_ASCENDABLE_SCHEMA, **do}
        self.cn_dataset_schema = {**self.DATASET_ASCENDABLE_SCHEMA, **self.SUBSET_ASCENDABLE_SCHEMA,
                                  **self.CN_SUBSET_ASCENDABLE_SCHEMA, **do}
        self.general_schema = {**self.DATASET_ASCENDABLE_SCHEMA, **self.SUBSET_ASCENDABLE_SCHEMA,
                               **(self.DB_SUBSET_ASCENDABLE_SCHEMA if support_dreambooth else {}),
                               **(self.CN_SUBSET_ASCENDABLE_SCHEMA if support_controlnet else {}), **do}

    @staticmethod
    def _check_table(table, schema, where: str, required=()) -> dict:
        if not isinstance(table, dict):
            raise UserError(f"dataset config: {where} must be a table")
        out = {}
        for key, value in table.items():
            if key not in schema:
                raise UserError(f"dataset config: unknown key '{key}' in {where} "
                                f"(allowed: {', '.join(sorted(schema))})")
            try:
                out[key] = schema[key](value)
            except _Invalid as e:
                raise UserError(f"dataset config: '{key}' in {where} {e}, got {value!r}") from None
        for key in required:
            if key not in table:
                raise UserError(f"dataset config: '{key}' is required in {where}")
        return out

    def sanitize_user_config(self, user_config: dict) -> dict:
        if not isinstance(user_config, dict):
            raise UserError("dataset config: the top level must be a table")
        for key in user_config:
            if key not in ("general", "datasets"):
                raise UserError(f"dataset config: unknown section '{key}' (allowed: [general], [[datasets]])")
        out = {}
        if "general" in user_config:
            out["general"] = self._check_table(user_config["general"], self.general_schema, "[general]")
        datasets = user_config.get("datasets", [])
        if not isinstance(datasets, list):
            raise UserError("dataset config: 'datasets' must be an array of tables ([[datasets]])")
        out["datasets"] = [self._sanitize_dataset(d, i) for i, d in enumerate(datasets)]
        return out

    def _sanitize_dataset(self, dataset: dict, index: int) -> dict:
        where = f"[[datasets]] #{index + 1}"
        if not isinstance(dataset, dict):
            raise UserError(f"dataset config: {where} must be a table")
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            raise UserError(f"dataset config: 'subsets' in {where} must be an array of tables ([[datasets.subsets]])")
        has_meta = ["metadata_file" in s for s in subsets]
        has_cond = ["conditioning_data_dir" in s for s in subsets]
        if any(has_cond) and not self.support_controlnet:
            raise UserError(f"dataset config: conditioning_data_dir (mask images for the masked loss) in {where} "
                            f"needs --masked_loss (kohya's ControlNet subsets)")
        if any(has_cond) and not all(has_cond):
            raise UserError(f"dataset config: conditioning_data_dir must be in every subset of {where} or in none "
                            f"(kohya's ControlNet datasets); split them into separate datasets")
        if subsets and all(has_cond):  # kohya's ControlNet subsets: DreamBooth folders with mask images
            schema, sub_schema, required = self.cn_dataset_schema, self.cn_subset_schema, ("image_dir",)
        elif all(has_meta) and subsets or (not subsets and not self.support_dreambooth):
            if not self.support_finetuning:
                raise UserError(f"dataset config: fine-tuning subsets (metadata_file) are not supported ({where})")
            schema, sub_schema, required = self.ft_dataset_schema, self.ft_subset_schema, ("metadata_file",)
        elif not any(has_meta):
            if not self.support_dreambooth:
                raise UserError(f"dataset config: DreamBooth subsets (no metadata_file) are not supported ({where})")
            schema, sub_schema, required = self.db_dataset_schema, self.db_subset_schema, ("image_dir",)
        else:
            raise UserError(f"dataset config: DreamBooth subsets and fine tuning subsets (metadata_file) cannot be "
                            f"mixed in the same dataset ({where}); split them into separate datasets")
        body = {k: v for k, v in dataset.items() if k != "subsets"}
        out = self._check_table(body, schema, where)
        out["subsets"] = [self._check_table(s, sub_schema, f"[[datasets.subsets]] #{j + 1} of {where}", required)
                          for j, s in enumerate(subsets)]
        return out


class BlueprintGenerator:
    def __init__(self, sanitizer: ConfigSanitizer):
        self.sanitizer = sanitizer

    def generate(self, user_config: dict, argparse_namespace: argparse.Namespace, **runtime_params) -> Blueprint:
        config = self.sanitizer.sanitize_user_config(user_config)
        optname_map = self.sanitizer.ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME
        argparse_config = {optname_map.get(k, k): v for k, v in vars(argparse_namespace).items()}
        if isinstance(argparse_config.get("resolution"), str):
            argparse_config["resolution"] = parse_resolution(argparse_config["resolution"])
        elif isinstance(argparse_config.get("resolution"), int):
            argparse_config["resolution"] = (argparse_config["resolution"],) * 2
        general = config.get("general", {})

        datasets = []
        for dataset_config in config.get("datasets", []):
            subsets = dataset_config.get("subsets", [])
            is_dreambooth = all("metadata_file" not in s for s in subsets)
            is_controlnet = bool(subsets) and all("conditioning_data_dir" in s for s in subsets)
            if is_controlnet:
                subset_klass, dataset_klass = ControlNetSubsetParams, ControlNetDatasetParams
            elif is_dreambooth:
                subset_klass, dataset_klass = DreamBoothSubsetParams, DreamBoothDatasetParams
            else:
                subset_klass, dataset_klass = FineTuningSubsetParams, FineTuningDatasetParams
            subset_bps = [SubsetBlueprint(self.generate_params_by_fallbacks(
                subset_klass, [s, dataset_config, general, argparse_config, runtime_params])) for s in subsets]
            params = self.generate_params_by_fallbacks(dataset_klass,
                                                       [dataset_config, general, argparse_config, runtime_params])
            datasets.append(DatasetBlueprint(is_dreambooth, params, subset_bps, is_controlnet))
        return Blueprint(DatasetGroupBlueprint(datasets))

    @staticmethod
    def generate_params_by_fallbacks(param_klass, fallbacks: Sequence[dict]):
        defaults = asdict(param_klass())
        return param_klass(**{name: BlueprintGenerator.search_value(name, fallbacks, default)
                              for name, default in defaults.items()})

    @staticmethod
    def search_value(key: str, fallbacks: Sequence[dict], default_value=None):
        for cand in fallbacks:
            value = cand.get(key)
            if value is not None:
                return value
        return default_value


def parse_resolution(text) -> Tuple[int, int]:
    """'size' or 'width,height' -> (width, height) (kohya's --resolution)."""
    try:
        values = tuple(int(r) for r in str(text).split(","))
    except ValueError:
        raise UserError(f"--resolution must be 'size' or 'width,height', got {text!r}") from None
    if len(values) == 1:
        values = (values[0], values[0])
    if len(values) != 2:
        raise UserError(f"--resolution must be 'size' or 'width,height', got {text!r}")
    return values


def _log_info(datasets, dataset_type: str):
    lines = []
    for i, dataset in enumerate(datasets):
        lines += [f"[{dataset_type} {i}]", f"  batch_size: {dataset.batch_size}",
                  f"  resolution: {(dataset.width, dataset.height)}",
                  f"  resize_interpolation: {dataset.resize_interpolation}",
                  f"  enable_bucket: {dataset.enable_bucket}"]
        if dataset.enable_bucket:
            lines += [f"  min_bucket_reso: {dataset.min_bucket_reso}", f"  max_bucket_reso: {dataset.max_bucket_reso}",
                      f"  bucket_reso_steps: {dataset.bucket_reso_steps}",
                      f"  bucket_no_upscale: {dataset.bucket_no_upscale}"]
        for j, s in enumerate(dataset.subsets):
            lines += [f"  [Subset {j} of {dataset_type} {i}]", f'    image_dir: "{s.image_dir}"',
                      f"    image_count: {s.img_count}", f"    num_repeats: {s.num_repeats}",
                      f"    shuffle_caption: {s.shuffle_caption}", f"    keep_tokens: {s.keep_tokens}",
                      f"    caption_dropout_rate: {s.caption_dropout_rate}",
                      f"    caption_dropout_every_n_epochs: {s.caption_dropout_every_n_epochs}",
                      f"    caption_tag_dropout_rate: {s.caption_tag_dropout_rate}",
                      f"    caption_prefix: {s.caption_prefix}", f"    caption_suffix: {s.caption_suffix}",
                      f"    color_aug: {s.color_aug}", f"    flip_aug: {s.flip_aug}",
                      f"    face_crop_aug_range: {s.face_crop_aug_range}", f"    random_crop: {s.random_crop}",
                      f"    token_warmup_min: {s.token_warmup_min}", f"    token_warmup_step: {s.token_warmup_step}",
                      f"    alpha_mask: {s.alpha_mask}", f"    custom_attributes: {s.custom_attributes}"]
            if isinstance(s, DreamBoothSubset) and s.conditioning_data_dir is not None:
                lines += [f'    conditioning_data_dir: "{s.conditioning_data_dir}"',
                          f"    caption_extension: {s.caption_extension}"]
            elif isinstance(s, DreamBoothSubset):
                lines += [f"    is_reg: {s.is_reg}", f"    class_tokens: {s.class_tokens}",
                          f"    caption_extension: {s.caption_extension}"]
            else:
                lines += [f"    metadata_file: {s.metadata_file}"]
    logger.info("\n".join(lines))


def _build(blueprint: DatasetBlueprint, is_training: bool):
    params = asdict(blueprint.params)
    if blueprint.is_dreambooth:
        subsets = [DreamBoothSubset(**asdict(s.params)) for s in blueprint.subsets]
        return DreamBoothDataset(subsets=subsets, is_training_dataset=is_training, **params)
    subsets = [FineTuningSubset(**asdict(s.params)) for s in blueprint.subsets]
    params.pop("prior_loss_weight", None)
    return FineTuningDataset(subsets=subsets, **params)


def generate_dataset_group_by_blueprint(dataset_group_blueprint: DatasetGroupBlueprint,
                                        ) -> Tuple[DatasetGroup, Optional[DatasetGroup]]:
    """Build the datasets, make their buckets and seed them (``random`` draws the
    seed, so seed ``random`` first for reproducible shuffles, as kohya)."""
    datasets = [_build(bp, True) for bp in dataset_group_blueprint.datasets]
    val_datasets = []
    for bp in dataset_group_blueprint.datasets:
        split = bp.params.validation_split
        if split < 0.0 or split > 1.0:
            logger.warning(f"Dataset param `validation_split` ({split}) is not a valid number between 0.0 and 1.0, "
                           f"skipping validation split...")
            continue
        if split == 0.0:
            continue
        if not bp.is_dreambooth:
            raise UserError("validation_split is supported for DreamBooth datasets only here "
                            "(kohya's fine-tuning datasets do not split either)")
        val_datasets.append(_build(bp, False))

    _log_info(datasets, "Dataset")
    if val_datasets:
        _log_info(val_datasets, "Validation Dataset")

    seed = random.randint(0, 2 ** 31)  # the actual per-epoch seed is seed + epoch
    for i, dataset in enumerate(datasets):
        logger.info(f"[Prepare dataset {i}]")
        dataset.make_buckets()
        dataset.set_seed(seed)
    for i, dataset in enumerate(val_datasets):
        logger.info(f"[Prepare validation dataset {i}]")
        dataset.make_buckets()
        dataset.set_seed(seed)
    return DatasetGroup(datasets), (DatasetGroup(val_datasets) if val_datasets else None)


def generate_dreambooth_subsets_config_by_subdirs(train_data_dir: Optional[str] = None,
                                                  reg_data_dir: Optional[str] = None) -> List[dict]:
    """Subsets from ``<repeats>_<class tokens>`` folders (folders without a leading integer are ignored)."""
    def generate(base_dir: Optional[str], is_reg: bool):
        if base_dir is None:
            return []
        base = Path(base_dir)
        if not base.is_dir():
            raise UserError(f"{'--reg_data_dir' if is_reg else '--train_data_dir'} is not a directory: {base_dir}")
        configs = []
        for subdir in sorted(base.iterdir()):
            if not subdir.is_dir():
                continue
            tokens = subdir.name.split("_")
            try:
                n_repeats = int(tokens[0])
            except ValueError:
                logger.warning(f"ignore directory without repeats: {subdir.name}")
                continue
            if n_repeats < 1:
                continue
            configs.append({"image_dir": str(subdir), "num_repeats": n_repeats, "is_reg": is_reg,
                            "class_tokens": "_".join(tokens[1:])})
        return configs

    return generate(train_data_dir, False) + generate(reg_data_dir, True)


def load_user_config(file) -> dict:
    path = Path(file)
    if not path.is_file():
        raise UserError(f"dataset config file not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith(".json"):
            with open(path, "r", encoding="utf-8") as f:
                return json.load(f)
        if name.endswith(".toml"):
            return toml.load(str(path))
    except (ValueError, toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse dataset config {path}: {e}") from e
    raise UserError(f"dataset config must be a .toml or .json file: {path}")


def user_config_from_args(args: argparse.Namespace) -> dict:
    """The dataset config for ``args``: the config file, or the command-line-only mode (kohya's train_network)."""
    if getattr(args, "dataset_config", None) is not None:
        # kohya warns and ignores these; here an option is honoured or refused
        both = [a for a in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, a, None) is not None]
        if both:
            raise UserError(f"--{', --'.join(both)} cannot be combined with --dataset_config "
                            f"(the config file defines the datasets): remove one of them")
        return load_user_config(args.dataset_config)
    if getattr(args, "train_data_dir", None) is None:
        raise UserError("no training data: pass --dataset_config or --train_data_dir")
    if getattr(args, "in_json", None) is None:
        logger.info("Using DreamBooth method.")
        return {"datasets": [{"subsets": generate_dreambooth_subsets_config_by_subdirs(
            args.train_data_dir, getattr(args, "reg_data_dir", None))}]}
    logger.info("Training with captions.")
    return {"datasets": [{"subsets": [{"image_dir": args.train_data_dir, "metadata_file": args.in_json}]}]}


def build_dataset_groups(args: argparse.Namespace, tokenizers=None, support_dropout: bool = True,
                         batch_size_multiplier: int = 1):
    """What kohya's trainer does before training: config -> blueprint -> dataset groups
    (buckets made), tokenizers attached; a UserError when no image was found.
    ``batch_size_multiplier``: data parallelism buckets global batches (batch_size x world size),
    see library/distributed.py."""
    user_config = user_config_from_args(args)
    # kohya's train_network: ControlNet (conditioning_data_dir) subsets only with --masked_loss
    support_controlnet = bool(getattr(args, "masked_loss", False))
    blueprint = BlueprintGenerator(ConfigSanitizer(True, True, support_controlnet, support_dropout)).generate(
        user_config, args)
    for dataset_blueprint in blueprint.dataset_group.datasets:
        dataset_blueprint.params.batch_size *= int(batch_size_multiplier)
    train_group, val_group = generate_dataset_group_by_blueprint(blueprint.dataset_group)
    if len(train_group) == 0:
        raise UserError("No data found. Please verify arguments (train_data_dir must be the parent of folders "
                        "with images)")
    if tokenizers is not None:
        max_token_length = getattr(args, "max_token_length", None)
        train_group.set_tokenizers(tokenizers, max_token_length)
        if val_group is not None:
            val_group.set_tokenizers(tokenizers, max_token_length)
    return train_group, val_group
