"""kohya's training arguments: the parser (kohya's names and defaults), ``--config_file`` and the
arguments this port does not implement yet (``NOT_IMPLEMENTED``: given a non-default value, the run
stops at start with one line naming it)."""
from __future__ import annotations

import argparse
import os
import sys

from library import config_util, train_util
from library.arg_utils import ArgumentParser, suggest_options
from library.device_utils import UserError, add_device_arguments
from library.sdxl_schedulers import KOHYA_SAMPLERS


# ---------------------------------------------------------------------------------------------
# arguments

class _Parser(ArgumentParser):
    """Exact option names, "did you mean" for an unknown one (``library.arg_utils``; kohya's parser takes
    prefixes); an error is one line, not usage + error."""

    def error(self, message):
        raise UserError(message)


# kohya arguments accepted by the parser that this port does not implement: (name, kwargs, why).
# Given any value other than the default, the run stops at start naming the argument and why;
# tools/argument_table.py puts the reasons in Limitations.md's table.
NOT_IMPLEMENTED = [
    ("--v2", dict(action="store_true"),
     "SD 2.x models: this port trains SDXL only"),
    ("--huggingface_repo_id", dict(type=str, default=None),
     "Hugging Face upload: not implemented"),
    ("--huggingface_repo_type", dict(type=str, default=None),
     "Hugging Face upload: not implemented"),
    ("--huggingface_path_in_repo", dict(type=str, default=None),
     "Hugging Face upload: not implemented"),
    ("--huggingface_token", dict(type=str, default=None),
     "Hugging Face upload: not implemented"),
    ("--huggingface_repo_visibility", dict(type=str, default=None),
     "Hugging Face upload: not implemented"),
    ("--save_state_to_huggingface", dict(action="store_true"),
     "Hugging Face upload: not implemented"),
    ("--resume_from_huggingface", dict(action="store_true"),
     "Hugging Face download of a state: not implemented"),
    ("--async_upload", dict(action="store_true"),
     "Hugging Face upload: not implemented"),
    ("--torch_compile", dict(action="store_true"),
     "torch.compile: MindSpore compiles graph mode steps itself"),
    ("--dynamo_backend", dict(type=str, default="inductor"),
     "torch.compile backend: MindSpore compiles graph mode steps itself"),
    ("--fp8_base", dict(action="store_true"),
     "fp8 base weights: not implemented"),
    ("--fp8_base_unet", dict(action="store_true"),
     "fp8 U-Net weights: not implemented (--fp16_unet_weights halves their memory)"),
    ("--ddp_timeout", dict(type=int, default=None),
     "torch DDP option: data parallel here is msrun (library/distributed.py)"),
    ("--ddp_gradient_as_bucket_view", dict(action="store_true"),
     "torch DDP option: data parallel here is msrun (library/distributed.py)"),
    ("--ddp_static_graph", dict(action="store_true"),
     "torch DDP option: data parallel here is msrun (library/distributed.py)"),
    ("--wandb_run_name", dict(type=str, default=None),
     "wandb logging: not implemented (TensorBoard only)"),
    ("--log_tracker_config", dict(type=str, default=None),
     "accelerate tracker config: not implemented (TensorBoard only)"),
    ("--wandb_api_key", dict(type=str, default=None),
     "wandb logging: not implemented (TensorBoard only)"),
    ("--lowram", dict(action="store_true"),
     "kohya loads the models straight to the GPU (Colab-like machines): no equivalent here"),
    ("--highvram", dict(action="store_true"),
     "kohya skips clearing the CUDA cache: no equivalent here"),
    ("--fused_backward_pass", dict(action="store_true"),
     "kohya's per-parameter optimizer step in the backward pass (torch hooks): not implemented"),
    ("--cpu_offload_checkpointing", dict(action="store_true"),
     "offloading checkpointed activations to the CPU: not implemented"),
    ("--conditioning_data_dir", dict(type=str, default=None),
     "kohya's train_network.py ignores it (an argument of its ControlNet scripts): for --masked_loss mask "
     "images, use conditioning_data_dir in the dataset .toml subsets"),
    ("--deepspeed", dict(action="store_true"),
     "DeepSpeed is a CUDA/torch library; data parallel here is msrun (library/distributed.py)"),
    ("--zero_stage", dict(type=int, default=2, choices=[0, 1, 2, 3]),
     "DeepSpeed option: DeepSpeed is a CUDA/torch library"),
    ("--offload_optimizer_device", dict(type=str, default=None, choices=[None, "cpu", "nvme"]),
     "DeepSpeed option: DeepSpeed is a CUDA/torch library"),
    ("--offload_optimizer_nvme_path", dict(type=str, default=None),
     "DeepSpeed option: DeepSpeed is a CUDA/torch library"),
    ("--offload_param_device", dict(type=str, default=None, choices=[None, "cpu", "nvme"]),
     "DeepSpeed option: DeepSpeed is a CUDA/torch library"),
    ("--offload_param_nvme_path", dict(type=str, default=None),
     "DeepSpeed option: DeepSpeed is a CUDA/torch library"),
    ("--zero3_init_flag", dict(action="store_true"),
     "DeepSpeed option: DeepSpeed is a CUDA/torch library"),
    ("--zero3_save_16bit_model", dict(action="store_true"),
     "DeepSpeed option: DeepSpeed is a CUDA/torch library"),
    ("--fp16_master_weights_and_gradients", dict(action="store_true"),
     "DeepSpeed option: DeepSpeed is a CUDA/torch library"),
]
_NOT_IMPLEMENTED_NAMES = [n for n, _, _ in NOT_IMPLEMENTED]
_WHY_NOT = {n: why for n, _, why in NOT_IMPLEMENTED}
# dataset arguments of train_util.add_dataset_arguments that the trainer does not honour yet
_DATASET_ARGS_NOT_IMPLEMENTED = ()


def setup_parser() -> argparse.ArgumentParser:
    parser = _Parser(description="LoRA training (kohya's train_network arguments)")
    add = parser.add_argument
    # models
    add("--pretrained_model_name_or_path", type=str, default=None,
        help="SDXL checkpoint: SAI single file (.safetensors / MindSpore .ckpt) or diffusers folder")
    add("--v_parameterization", action="store_true", help="v-prediction target")
    add("--vae", type=str, default=None, help="a separate VAE (file or diffusers folder)")
    add("--tokenizer_cache_dir", type=str, default=None,
        help="kohya's tokenizer cache folder: the CLIP tokenizers are read from it when there, else the bundled "
             "ones are written to it (nothing is downloaded)")
    add("--disable_mmap_load_safetensors", action="store_true",
        help="read .safetensors files without mmap (always so in this port)")
    # dataset
    train_util.add_dataset_arguments(parser, True, True, True)
    train_util.add_text_encoder_cache_arguments(parser)
    train_util.add_data_loader_arguments(parser)
    config_util.add_config_arguments(parser)
    # training
    add("--output_dir", type=str, default=None, help="directory to output trained model")
    add("--output_name", type=str, default=None, help="base name of trained model file")
    add("--save_precision", type=str, default=None, choices=[None, "float", "fp32", "fp16", "bf16"],
        help="precision in saving (fp32 is accepted as float)")
    add("--save_every_n_epochs", type=int, default=None, help="save checkpoint every N epochs")
    add("--save_every_n_steps", type=int, default=None, help="save checkpoint every N steps")
    add("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch files")
    add("--save_last_n_steps", type=int, default=None, help="keep step files of the last N steps only")
    add("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
        help="format to save the model (default is .safetensors; ckpt: MindSpore checkpoint with the metadata; "
             "pt: torch.save file, no metadata, as kohya's)")
    add("--save_n_epoch_ratio", type=int, default=None,
        help="save checkpoint N epoch ratio (for example 5 means save at least 5 files total)")
    add("--save_state", action="store_true",
        help="save training state (LoRA, optimizer, step, RNG) with every saved model, for --resume")
    add("--save_state_on_train_end", action="store_true", help="save training state at the end of training")
    add("--save_last_n_epochs_state", type=int, default=None,
        help="keep only the last N epoch states (overrides --save_last_n_epochs for states)")
    add("--save_last_n_steps_state", type=int, default=None,
        help="keep only the states of the last N steps (overrides --save_last_n_steps for states)")
    add("--resume", type=str, default=None, help="continue from this saved state folder")
    add("--initial_epoch", type=int, default=None,
        help="initial epoch number, 1 means the first epoch (same as not given); the LR schedule still starts at "
             "its beginning (kohya)")
    add("--initial_step", type=int, default=None,
        help="initial step number counted over all epochs, 0 means the first step; overrides --initial_epoch")
    add("--skip_until_initial_step", action="store_true",
        help="skip the batches before the initial step (same data as a run that got there); without it only the "
             "epochs before the initial step's epoch are left out")
    add("--logging_dir", type=str, default=None,
        help="write TensorBoard logs (loss, average loss, lr per group) under this folder")
    add("--log_with", type=str, default=None, choices=[None, "tensorboard", "wandb", "all"],
        help="what logs (tensorboard; wandb is not available in this port)")
    add("--log_prefix", type=str, default=None, help="prefix of each log folder name")
    add("--log_tracker_name", type=str, default=None, help="name of the log run subfolder (default network_train)")
    add("--log_config", action="store_true", help="also log the training arguments (as text)")
    add("--validation_seed", type=int, default=None,
        help="seed of the validation split and of the validation noise (--seed otherwise)")
    add("--validation_split", type=float, default=0.0,
        help="fraction of the (DreamBooth) training images held out for the validation loss")
    add("--validate_every_n_steps", type=int, default=None,
        help="validation loss every N steps (by default only at each epoch end, when there is a validation split)")
    add("--validate_every_n_epochs", type=int, default=None, help="validation loss every N epochs (default every epoch)")
    add("--max_validation_steps", type=int, default=None, help="at most this many validation batches per pass")
    add("--train_batch_size", type=int, default=1, help="batch size for training")
    add("--max_token_length", type=int, default=None, choices=[None, 150, 225],
        help="max token length of text encoder (default for 75, 150 or 225)")
    add("--mem_eff_attn", action="store_true",
        help="memory-efficient attention in the UNet (chunked; flash on Ascend is --xformers/--sdpa/--flash_attn)")
    add("--xformers", action="store_true",
        help="memory-efficient attention in the UNet: flash on Ascend, chunked elsewhere (xformers is CUDA-only)")
    add("--sdpa", action="store_true",
        help="scaled dot-product attention in the UNet: flash on Ascend, plain (exact, fastest) elsewhere")
    add("--flash_attn", action="store_true", help="flash attention in the UNet (Ascend only)")
    add("--max_train_steps", type=int, default=1600, help="training steps")
    add("--max_train_epochs", type=int, default=None, help="training epochs (overrides max_train_steps)")
    add("--seed", type=int, default=None, help="random seed for training")
    add("--gradient_checkpointing", action="store_true", help="gradient checkpointing (MindSpore recompute)")
    add("--gradient_accumulation_steps", type=int, default=1,
        help="number of updates steps to accumulate before performing a backward/update pass")
    add("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
        help="U-Net and text encoders in fp16/bf16 with fp32 LoRA weights; fp16 with dynamic loss scaling "
             "(bf16 needs Ascend)")
    add("--fp16_unet_weights", action="store_true",
        help="with --mixed_precision no: keep the frozen U-Net weights in fp16 (half their memory; an fp16 "
             "checkpoint loses nothing) and compute in fp32, each layer casting its weight as it runs")
    add("--full_fp16", action="store_true", help="fp16 training including the LoRA weights and optimizer state")
    add("--full_bf16", action="store_true", help="bf16 training including the LoRA weights and optimizer state")
    add("--noise_offset", type=float, default=None, help="noise offset (0.1 recommended)")
    add("--noise_offset_random_strength", action="store_true",
        help="use random strength between 0~noise_offset for noise offset")
    add("--ip_noise_gamma", type=float, default=None, help="input perturbation noise (0.1 recommended)")
    add("--ip_noise_gamma_random_strength", action="store_true",
        help="use random strength between 0~ip_noise_gamma for input perturbation noise")
    add("--adaptive_noise_scale", type=float, default=None,
        help="add latent mean absolute value * this value to noise_offset")
    add("--zero_terminal_snr", action="store_true", help="fix noise scheduler betas to enforce zero terminal SNR")
    add("--min_timestep", type=int, default=None, help="minimum timestep (default 0)")
    add("--max_timestep", type=int, default=None, help="maximum timestep, exclusive (default 1000)")
    add("--prior_loss_weight", type=float, default=1.0, help="loss weight for regularization images")
    add("--min_snr_gamma", type=float, default=None, help="gamma for reducing the weight of high loss timesteps")
    add("--scale_v_pred_loss_like_noise_pred", action="store_true",
        help="scale v-prediction loss like noise prediction loss")
    add("--v_pred_like_loss", type=float, default=None, help="add v-prediction like loss multiplied by this value")
    add("--debiased_estimation_loss", action="store_true", help="debiased estimation loss")
    add("--weighted_captions", action="store_true",
        help="captions' (word:1.2), (word) = x1.1, [word] = /1.1 weight the text encoders' hidden states of those "
             "tokens (kohya's syntax; \\( for a literal bracket). Keep commas out of the brackets when captions are "
             "shuffled or dropped by tag")
    add("--multires_noise_iterations", type=int, default=None,
        help="enable multires (pyramid) noise with this number of iterations (6-10 recommended)")
    add("--multires_noise_discount", type=float, default=0.3,
        help="discount of each multires noise level (0.8 recommended; kohya's default 0.3)")
    add("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"],
        help="loss function: l2 (default), l1, huber or smooth_l1")
    add("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"],
        help="huber_c over the timesteps for loss_type huber/smooth_l1: constant, exponential or snr (default)")
    add("--huber_c", type=float, default=0.1, help="huber loss decay parameter for huber/smooth_l1 (default 0.1)")
    add("--huber_scale", type=float, default=1.0,
        help="huber loss scale for huber/smooth_l1 (constant and exponential schedules; default 1.0)")
    add("--masked_loss", action="store_true",
        help="mask the loss with mask images (conditioning_data_dir in the dataset .toml subsets, red channel) "
             "or the alpha channel of alpha_mask subsets; a batch with alpha masks is always masked, as kohya")
    add("--config_file", type=str, default=None,
        help="a .toml with these arguments (sections flattened); the command line overrides it")
    add("--output_config", action="store_true",
        help="write the arguments that differ from their defaults to --config_file (a new .toml) and stop")
    from library.train_logging import add_logging_arguments

    add_logging_arguments(parser)
    # kohya's sai_model_spec.add_model_spec_arguments: written into the LoRA as modelspec.<name>
    for name, what in (("title", "title (default: output_name)"), ("author", "author name"),
                       ("description", "description"), ("license", "license"), ("tags", "tags, comma-separated"),
                       ("usage_hint", "usage hint"),
                       ("thumbnail", "thumbnail image: a data URL or an image file (stored as a data URL)"),
                       ("merged_from", "source models of a merge"), ("trigger_phrase", "trigger phrase"),
                       ("preprocessor", "preprocessor used"),
                       ("is_negative_embedding", "whether this is a negative embedding")):
        add(f"--metadata_{name}", type=str, default=None, help=f"{what} for the model metadata (modelspec.{name})")
    add("--no_half_vae", action="store_true", help="keep the VAE in float32 (it is float32 here: always honoured)")
    # optimizer
    add("--optimizer_type", type=str, default="",
        help="AdamW (default), SGDNesterov, Lion, AdaFactor, CAME (or pytorch_optimizer.CAME), Prodigy, DAdaptAdam "
             "(case-insensitive), or a dotted path to a MindSpore optimizer cell (see library/train_optimizers.py); "
             "8-bit/paged, other DAdapt variants and schedule-free ones stop")
    add("--use_8bit_adam", action="store_true", help="kohya's 8-bit AdamW (bitsandbytes, CUDA-only): stops the run")
    add("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion")
    add("--learning_rate", type=float, default=2.0e-6, help="learning rate")
    add("--max_grad_norm", type=float, default=1.0, help="max gradient norm, 0 for no clipping")
    add("--scale_weight_norms", type=float, default=None,
        help="after each update, scale every LoRA module whose up@down*scale norm exceeds this (kohya's max-norm)")
    add("--optimizer_args", type=str, default=None, nargs="*",
        help="additional arguments for optimizer (like \"weight_decay=0.01 betas=0.9,0.999\")")
    add("--lr_scheduler", type=str, default="constant",
        help="constant (default), constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, "
             "inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant "
             "(--lr_scheduler_args step_rules=...), adafactor")
    add("--lr_scheduler_type", type=str, default="",
        help="dotted path to a schedule class (base_lrs, **lr_scheduler_args) with lrs(step); torch ones stop")
    add("--lr_scheduler_args", type=str, default=None, nargs="*",
        help="additional arguments for the scheduler (like \"step_rules=1:10,0.1:20,0.01\")")
    add("--lr_decay_steps", type=str, default="0",
        help="decay steps of warmup_stable_decay: an int, a ratio < 1 of the training steps, or 'N%%'")
    add("--lr_scheduler_timescale", type=int, default=None,
        help="inverse_sqrt timescale (default: the warmup steps, or 10000 without warmup)")
    add("--lr_scheduler_min_lr_ratio", type=float, default=None,
        help="minimum lr as a ratio of the initial lr (cosine_with_min_lr, warmup_stable_decay)")
    add("--lr_warmup_steps", type=str, default="0",
        help="warmup steps: an int, a ratio < 1 of the training steps, or 'N%%'")
    add("--lr_scheduler_num_cycles", type=int, default=1, help="restarts for cosine_with_restarts")
    add("--lr_scheduler_power", type=float, default=1, help="polynomial power")
    # network
    add("--no_metadata", action="store_true", help="do not save metadata in output model")
    add("--unet_lr", type=float, default=None, help="learning rate for U-Net")
    add("--text_encoder_lr", type=float, default=None, nargs="*",
        help="learning rate for the text encoders: one value for both, or one per text encoder (TE1 TE2)")
    add("--network_weights", type=str, default=None, help="pretrained weights for network")
    add("--base_weights", type=str, default=None, nargs="*",
        help="network weights (LoRA files) to merge into the model before training")
    add("--base_weights_multiplier", type=float, default=None, nargs="*",
        help="multiplier for each --base_weights file, in order (1 for the files it does not reach)")
    add("--dim_from_weights", action="store_true",
        help="take each module's dim and alpha from --network_weights (kohya's option)")
    add("--network_module", type=str, default=None,
        help="network module to train, imported by name: networks.lora (LoRA) or networks.loha (LyCORIS LoHa)")
    add("--network_dim", type=int, default=None, help="network dimensions (depends on each network)")
    add("--network_alpha", type=float, default=1, help="alpha for LoRA weight scaling")
    add("--network_dropout", type=float, default=None, help="drops neurons out of training every step")
    add("--network_args", type=str, default=None, nargs="*", help="additional arguments for network (key=value)")
    add("--network_train_unet_only", action="store_true", help="only training U-Net part")
    add("--network_train_text_encoder_only", action="store_true", help="only training Text Encoder part")
    add("--clip_skip", type=int, default=None,
        help="kohya's SD 1.x/2.x option; SDXL training does not use it (kohya warns 'clip_skip will be "
             "unexpected'): stops the run here")
    add("--training_comment", type=str, default=None, help="arbitrary comment string stored in metadata")
    # sample images (library/train_sampling.py)
    add("--sample_every_n_steps", type=int, default=None, help="generate sample images every N steps")
    add("--sample_every_n_epochs", type=int, default=None,
        help="generate sample images every N epochs (overwrites n_steps)")
    add("--sample_at_first", action="store_true", help="generate sample images before training")
    add("--sample_prompts", type=str, default=None,
        help="file of prompts to generate sample images: .txt (kohya's --n --w --h --d --l --s --ss options), "
             ".toml or .json")
    add("--sample_sampler", type=str, default="ddim",
        help=f"sampler for sample images, any of kohya's {len(KOHYA_SAMPLERS)}: {', '.join(KOHYA_SAMPLERS)}")
    add_device_arguments(parser)
    existing = {a for action in parser._actions for a in action.option_strings}
    for name, kwargs, why in NOT_IMPLEMENTED:
        if name in existing:
            continue
        parser.add_argument(name, help=f"not implemented in this port ({why}): stops the run when given", **kwargs)
    return parser


def read_config_from_file(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """kohya's ``--config_file``: a .toml whose sections are flattened; the command line wins.
    Unknown keys stop the run (kohya accepts them silently)."""
    if not args.config_file:
        return args
    import toml

    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    if not os.path.exists(path):
        raise UserError(f"{path}: config file not found")
    try:
        config = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot parse config file: {e}") from None
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in flat if k not in known)
    if unknown:
        hints = [f"{k}: did you mean {' or '.join(c[2:] for c in close)}?" for k in unknown
                 for close in [suggest_options(parser, "--" + k)] if close]
        raise UserError(f"{path}: unknown argument(s) {', '.join(unknown)}"
                        + (f" ({'; '.join(hints)})" if hints else ""))
    flat.pop("config_file", None)
    return parser.parse_args(sys.argv[1:] if args._argv is None else args._argv,
                             namespace=argparse.Namespace(**flat))


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    args._argv = argv
    if args.config_file and not args.output_config:  # with --output_config the file is written, not read
        args = read_config_from_file(args, parser)
    return args


def write_output_config(args, parser) -> str:
    """kohya's ``--output_config``: the arguments that differ from the parser's defaults (less config_file,
    output_config and wandb_api_key) into the ``--config_file`` path as toml; an existing file is not
    overwritten. kohya trains on, silently, when no --config_file is given: here that stops."""
    import toml

    if not args.config_file:
        raise UserError("--output_config writes the arguments to the --config_file path: give --config_file")
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    if os.path.exists(path):
        raise UserError(f"{path}: config file already exists (--output_config does not overwrite it)")
    defaults = vars(parser.parse_args([]))
    values = {k: v for k, v in vars(args).items() if not k.startswith("_")
              and k not in ("config_file", "output_config", "wandb_api_key")
              and not (k in defaults and v == defaults[k])}
    values = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in values.items()}
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: folder {folder} does not exist")
    with open(path + ".tmp", "w", encoding="utf-8") as f:  # no half-written config if toml fails
        toml.dump(values, f)
    os.replace(path + ".tmp", path)
    return path


def text_encoder_lrs(value):
    """``--text_encoder_lr`` as given on the command line (a list) or in a ``--config_file`` (a number or a
    list) -> None (not given) or [lr] / [lr1, lr2]; anything else stops the run."""
    if value is None or value == []:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    if not 1 <= len(values) <= 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in values):
        raise UserError(f"--text_encoder_lr {value!r}: give one number for both text encoders or one per "
                        f"text encoder (two numbers)")
    return [float(v) for v in values]


def check_not_implemented(args, parser):
    """Stop at start for any not-yet-implemented kohya argument given a non-default value."""
    for name in _NOT_IMPLEMENTED_NAMES + list(_DATASET_ARGS_NOT_IMPLEMENTED):
        dest = name[2:]
        default = parser.get_default(dest)
        value = getattr(args, dest, default)
        if value != default and not (_unset(value) and _unset(default)):
            raise UserError(f"{name} is not implemented in this port: {_WHY_NOT.get(name, 'not yet')} "
                            "(remove it to train)")


def _unset(value):
    """None, False or empty: what an option left out gives. A number is a value, 0 included (``0 == False``)."""
    return value is None or value is False or (isinstance(value, (str, list, tuple)) and len(value) == 0)
