"""kohya's ``train_network.py``: ``NetworkTrainer``, the generic LoRA training loop.

Model-specific parts (loading, tokenizers, the loss cell that conditions and
calls the UNet, the batch -> step inputs) are methods that
``sdxl_train_network.SdxlNetworkTrainer`` provides; this file holds the
arguments, data, network, optimizer, schedule, the compiled step, saving and
the loop.

The step: forward (text encoders + UNet with LoRA), backward over the LoRA
parameters only (base weights frozen), global-norm clipping and the AdamW
update are ONE graph-mode cell (``TrainStep``); with
``--gradient_accumulation_steps`` > 1 one cell accumulates gradients and a
second small one clips and updates. With ``--gradient_checkpointing`` the
forward and backward run as a chain of compiled segments instead
(``SegmentedStep``, ``library/segments.py``: one graph per U-Net layer, the
backward recomputing one layer at a time) and the same update cells follow. Random numbers (noise, timesteps, noise
offsets) are drawn on the host from one numpy generator seeded by ``--seed``
and fed to the step, so the graph does not depend on the loss options.

Graph mode compiles once per input shape: each (bucket resolution, batch
size) pair compiles its own graph on first use (MindSpore caches it); the
smaller last batch of a bucket is another shape. Dynamic shapes
(``set_inputs`` with None dims) compile once for all buckets, but on the CPU
backend the dynamic-shape step ran ~8x slower per step (measured on the tiny
demo model, 2 buckets: static 0.42 s/step + 75-92 s compile per shape,
dynamic 3.6 s/step + 127 s compile once), so per-shape compilation is the
default; ``KOHYA_MS_DYNAMIC_SHAPES=1`` switches to one dynamic compile
(experimental, worth re-measuring on Ascend).

Arguments (library/train_args.py): kohya's names and defaults. An argument that
this port does not implement yet stops the run at start with one line naming it
(see ``NOT_IMPLEMENTED``) when it is given a non-default value. The step cells
are in library/train_step.py, output names and the loss curve in
library/train_outputs.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import library  # noqa: E402,F401  (sets the CPU runtime env before mindspore loads)
from library import config_util, train_util  # noqa: E402
from library.device_utils import UserError, peak_rss_gb, release_host_memory, reset_peak_rss, rss_gb  # noqa: E402
from library.path_utils import check_output_folder, make_output_folder  # noqa: E402
from library.train_args import (NOT_IMPLEMENTED, check_not_implemented, parse_args, setup_parser,  # noqa: E402,F401
                                text_encoder_lrs)
from library.train_outputs import (get_epoch_ckpt_name, get_last_ckpt_name, get_step_ckpt_name,  # noqa: E402
                                   write_loss_curve_png)
from library.train_step import (ParameterwiseUpdate, SegmentedLoss, SegmentedStep, _build_step_cells,  # noqa: E402,F401
                                _step_cells)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# trainer

class NetworkTrainer:
    """kohya's NetworkTrainer; the model-specific hooks raise here and are implemented by subclasses."""

    def __init__(self):
        self.vae_scale_factor = 0.18215
        self.is_sdxl = False
        self.dynamic_shapes = os.environ.get("KOHYA_MS_DYNAMIC_SHAPES", "0") == "1"

    # -- hooks -----------------------------------------------------------------------------
    def assert_extra_args(self, args, train_dataset_group):
        pass

    def load_tokenizers(self, args):
        raise NotImplementedError

    def load_target_model(self, args):
        """-> (model_version, text_encoders list, vae, unet)."""
        raise NotImplementedError

    def build_loss_net(self, args, text_encoders, unet):
        """-> a Cell taking ``step_inputs(...)`` and returning the scalar loss."""
        raise NotImplementedError

    def cache_text_encoder_outputs(self, args, text_encoders, dataset_groups):
        """--cache_text_encoder_outputs: every caption's text encoder outputs into the datasets."""
        raise UserError("--cache_text_encoder_outputs is not supported by this trainer")

    def step_inputs(self, args, batch, latents, noise, noisy_noise, timesteps, weights, noise_schedule):
        raise NotImplementedError

    def make_validator(self, args, val_group, loss_net, vae, noise_schedule, set_train_modes):
        """The validation-loss runner: inputs built as for a training batch, at the given timesteps."""
        import numpy as np

        from library import custom_train_functions as ctf
        from library.latent_cache import make_vae_encode_fn
        from library.train_validation import Validator

        seed = args.validation_seed if args.validation_seed is not None else args.seed
        encode = None
        if val_group is not None and not args.cache_latents:
            encode = make_vae_encode_fn(vae, sample=True, seed=seed)

        def encode_latents(batch, rng):
            latents = batch["latents"]
            if latents is None:
                encode.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
                latents = np.concatenate([encode(batch["images"][i:i + args.vae_batch_size])
                                          for i in range(0, len(batch["images"]), args.vae_batch_size)])
            return (latents * self.vae_scale_factor).astype(np.float32)

        def make_inputs(batch, latents, rng, timesteps):  # the training batch's noise and weights
            noise, noisy_noise, _ = ctf.draw_noise(args, latents, rng, lambda r: timesteps)
            weights = (np.asarray(batch["loss_weights"], np.float32)
                       * ctf.post_process_loss_weights(args, timesteps, noise_schedule)).astype(np.float32)
            return self.step_inputs(args, batch, latents, noise, noisy_noise, timesteps, weights, noise_schedule)

        return Validator(args, val_group, loss_net, make_inputs, encode_latents,
                         set_eval=lambda: loss_net.set_train(False), set_train=set_train_modes)

    # -- checks ----------------------------------------------------------------------------
    def verify_args(self, args, parser):
        check_not_implemented(args, parser)
        # --debug_dataset loads no model and writes nothing (kohya returns before both)
        if args.pretrained_model_name_or_path is None and not args.debug_dataset:
            raise UserError("--pretrained_model_name_or_path is required")
        if args.output_dir is None and not args.debug_dataset:
            raise UserError("--output_dir is required")
        # the outputs are written after the model load, caching and compile: a bad path must stop now
        if args.output_dir is not None:
            check_output_folder(args.output_dir, "--output_dir")
        if args.logging_dir is not None:
            check_output_folder(args.logging_dir, "--logging_dir")
        if args.dim_from_weights:
            if args.network_weights is None:
                raise UserError("--dim_from_weights needs --network_weights (the file the dims come from)")
            # kohya builds the network from the file and drops these silently; here they are refused
            # (--network_alpha: any value but its default 1, which cannot be told from not given)
            given = [name for name, value in (("--network_dim", args.network_dim),
                                              ("--network_dropout", args.network_dropout)) if value is not None]
            if args.network_alpha is not None and float(args.network_alpha) != 1.0:
                given.append("--network_alpha")
            if given:
                raise UserError(f"{', '.join(given)} cannot be combined with --dim_from_weights "
                                "(dims and alphas come from --network_weights)")
        check_base_weights(args)  # the files read now, not after the checkpoint load
        if args.scale_weight_norms is not None and args.scale_weight_norms <= 0:
            raise UserError(f"--scale_weight_norms must be positive, got {args.scale_weight_norms}")
        from networks.network_base import import_network_module, parse_network_args

        # kohya's plugin point: the module is imported by name, now, so that a typo stops before the checkpoint
        self.network_module = import_network_module(args.network_module)
        # network_args checked now, not after the checkpoint load and latent caching that precede the network
        self.net_kwargs = parse_network_args(args.network_args)
        check = getattr(self.network_module, "check_network_args", None)  # optional: kohya's modules lack it
        if check is not None:
            check(self.net_kwargs, self.is_sdxl, args.network_dim, args.network_alpha, args.network_dropout,
                  args.dim_from_weights)
        if args.full_fp16 and args.mixed_precision != "fp16":
            raise UserError("full_fp16 requires mixed precision='fp16'")
        if args.full_bf16 and args.mixed_precision != "bf16":
            raise UserError("full_bf16 requires mixed precision='bf16'")
        if args.full_fp16 and args.full_bf16:
            raise UserError("--full_fp16 and --full_bf16 cannot be used together")
        if args.fp16_unet_weights and args.mixed_precision != "no":
            raise UserError(f"--fp16_unet_weights is for --mixed_precision no (with {args.mixed_precision} the "
                            f"U-Net weights are half precision already)")
        from library.train_optimizers import check_optimizer_args

        if args.lr_scheduler_type:
            from library.lr_schedules import _custom_schedule_class

            # the class first: a torch one's reason to stop comes before its warmup (or other) arguments
            _custom_schedule_class(args.lr_scheduler_type)
        check_optimizer_args(args)
        if args.save_precision == "fp32":
            args.save_precision = "float"
        if args.gradient_accumulation_steps < 1:
            raise UserError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
        if args.train_batch_size < 1:
            raise UserError(f"--train_batch_size must be >= 1, got {args.train_batch_size}")
        if args.max_grad_norm is not None and args.max_grad_norm < 0:
            raise UserError(f"--max_grad_norm must be >= 0, got {args.max_grad_norm}")
        if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
            raise UserError("scale_v_pred_loss_like_noise_pred can be enabled only with v_parameterization")
        if args.v_pred_like_loss and args.v_parameterization:
            raise UserError("v_pred_like_loss cannot be enabled with v_parameterization")
        if args.adaptive_noise_scale is not None and args.noise_offset is None:
            raise UserError("adaptive_noise_scale requires noise_offset")
        min_t = 0 if args.min_timestep is None else args.min_timestep
        max_t = 1000 if args.max_timestep is None else args.max_timestep
        if not (0 <= min_t < max_t <= 1000):
            raise UserError(f"--min_timestep/--max_timestep must satisfy 0 <= min < max <= 1000, got {min_t}, {max_t}")
        from library import train_sampling

        train_sampling.check_sample_args(args)  # prompts file and sampler; before output_name's default
        if args.output_name is None:
            args.output_name = "last"
        from library import train_logging

        self.log_with = train_logging.check_logging_args(args)
        from library.lora_metadata import check_metadata_args

        check_metadata_args(args)  # --metadata_thumbnail is read when the LoRA is saved: its file must exist now
        for name in ("save_n_epoch_ratio", "save_last_n_epochs_state", "save_last_n_steps_state"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.resume is not None:
            from library.train_state import read_state

            self.resume_state = read_state(args.resume)  # a bad folder stops before any model work
        if args.gradient_checkpointing and self.dynamic_shapes:
            raise UserError("KOHYA_MS_DYNAMIC_SHAPES=1 cannot be combined with --gradient_checkpointing (the "
                            "segmented step compiles per shape)")
        train_util.check_initial_step_args(args)
        if args.clip_skip is not None and self.is_sdxl:
            # kohya's verify_sdxl_training_args only warns and trains without it (but writes it into the metadata)
            raise UserError(f"--clip_skip {args.clip_skip}: SDXL training does not use clip_skip (kohya: 'clip_skip "
                            "will be unexpected'; text encoder 1's penultimate layer is always used): remove it")
        if args.network_train_unet_only and args.network_train_text_encoder_only:
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only together leave nothing "
                            "to train")
        if args.network_train_text_encoder_only and args.unet_lr:
            logger.warning("--unet_lr is not used with --network_train_text_encoder_only")
        if args.mem_eff_attn and args.flash_attn:
            raise UserError("--mem_eff_attn and --flash_attn cannot be used together")
        args.text_encoder_lr = text_encoder_lrs(args.text_encoder_lr)  # a number in a config file, a list here
        if args.network_train_unet_only and args.text_encoder_lr and any(args.text_encoder_lr):
            logger.warning("--text_encoder_lr is not used with --network_train_unet_only")

    # -- training --------------------------------------------------------------------------
    def train(self, args, parser=None):
        parser = parser or setup_parser()
        self.verify_args(args, parser)
        train_util.prepare_dataset_args(args, True)
        from library.device_utils import setup_device_from_args
        from library.distributed import init_distributed

        self.dp = init_distributed(args)  # msrun/mpirun: joins the job (rank 0 of 1 otherwise)
        target = setup_device_from_args(args)
        if args.mixed_precision != "no":
            from library.device_utils import check_dtype_supported

            check_dtype_supported(args.mixed_precision, target)
        if args.flash_attn and target != "Ascend":
            raise UserError(f"--flash_attn needs Ascend (device is {target}); use --mem_eff_attn, --xformers, "
                            "--sdpa or none")

        import numpy as np
        import mindspore as ms
        from mindspore import ParameterTuple
        from tqdm import tqdm

        from library import custom_train_functions as ctf
        from library import lora_metadata, train_logging, train_state, train_validation
        from library.loss_scaler import DynamicLossScaler
        from library.latent_cache import make_vae_encode_fn
        from library.train_optimizers import create_lr_schedule, create_optimizer, get_optimizer_train_eval_fn
        from library.train_sampling import should_sample

        network_module = self.network_module  # imported in verify_args

        session_id = random.randint(0, 2 ** 32)
        training_started_at = time.time()
        if args.seed is None:
            args.seed = random.randint(0, 2 ** 32 - 1)
        random.seed(args.seed)
        np.random.seed(args.seed % (2 ** 32))
        ms.set_seed(args.seed % (2 ** 31))

        tokenizers = self.load_tokenizers(args)
        train_group, val_group = config_util.build_dataset_groups(args, tokenizers,
                                                                  batch_size_multiplier=self.dp.world_size)
        if args.cache_info and not any(isinstance(d, train_util.DreamBoothDataset) for d in train_group.datasets):
            raise UserError("--cache_info caches the image sizes and captions of DreamBooth subsets (image_dir "
                            "without metadata_file); this dataset has none: remove it")
        if args.debug_dataset:  # kohya: print the batches, then return before any model work
            train_util.debug_dataset(train_group)
            if val_group is not None:
                train_util.debug_dataset(val_group)
            logger.info("--debug_dataset: stopping without training")
            return None
        self.dp.shard_dataset_group(train_group)  # each rank loads its part of every global batch
        train_util.verify_dataset_args(args, train_group, val_group, args.network_train_unet_only)
        self.assert_extra_args(args, train_group)
        train_util.scan_dataset_group(train_group)
        if val_group is not None:
            self.assert_extra_args(args, val_group)
            train_util.scan_dataset_group(val_group)
        # the initial step against the steps, now that the batches per epoch are known (before the model load)
        train_util.check_initial_step(args, len(train_group), args.gradient_accumulation_steps)

        model_version, text_encoders, vae, unet = self.load_target_model(args)
        if args.base_weights:  # computed in fp32 before the models go to half precision (kohya: merged, then cast;
            # a U-Net read in fp16 by --fp16_unet_weights gets the fp32 sum rounded to fp16). kohya merges after
            # caching the text encoder outputs, so a base LoRA's text encoder part never reaches cached outputs;
            # here it is merged first, and the cache holds the model that is trained
            merge_base_weights(args.base_weights, args.base_weights_multiplier, text_encoders, vae, unet)
        weight_dtype = {"no": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[args.mixed_precision]
        if weight_dtype != ms.float32:  # frozen models in half precision (before LoRA wraps their layers)
            from library.clip_text_model import cast_params

            unet.to_dtype(weight_dtype)
            for te in text_encoders:
                cast_params(te, weight_dtype)
        if args.fp16_unet_weights:  # checked in verify_args: --mixed_precision no
            unet.to_dtype(ms.float16, compute_dtype=ms.float32)
            release_host_memory()  # the fp32 weights just freed
        from library.attention import attention_impl_for_flags

        attention_impl = attention_impl_for_flags(vars(args), target)  # --mem_eff_attn/--xformers/--sdpa/...
        if attention_impl:
            logger.info(f"U-Net attention: {attention_impl}")
            unet.set_attention_impl(attention_impl)
        if args.gradient_checkpointing:
            unet.set_gradient_checkpointing(True)

        vae_encode = None
        if args.cache_latents:
            logger.info("caching latents")
            with self.dp.main_process_first(args.cache_latents_to_disk):  # rank 0 writes the files
                train_group.cache_latents(make_vae_encode_fn(vae, sample=True, seed=args.seed), args.vae_batch_size,
                                          args.cache_latents_to_disk, args.skip_cache_check)
                if val_group is not None:
                    val_group.cache_latents(make_vae_encode_fn(vae, sample=True, seed=args.seed), args.vae_batch_size,
                                            args.cache_latents_to_disk, args.skip_cache_check)
        else:
            vae_encode = make_vae_encode_fn(vae, sample=True, seed=args.seed + self.dp.rank)  # per-rank sampling
        if args.cache_text_encoder_outputs:
            logger.info("caching text encoder outputs")
            with self.dp.main_process_first(args.cache_text_encoder_outputs_to_disk):
                self.cache_text_encoder_outputs(args, text_encoders,
                                                [g for g in (train_group, val_group) if g is not None])
        release_host_memory()  # what loading and caching freed, before the step is compiled
        logger.info("host memory after loading and caching: %.2f GB", rss_gb() or 0.0)

        # network
        net_kwargs = self.net_kwargs  # parsed and checked in verify_args
        if args.dim_from_weights:
            network, _ = network_module.create_network_from_weights(1, args.network_weights, vae, text_encoders,
                                                                    unet, **net_kwargs)
        else:
            network = network_module.create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoders,
                                                    unet, neuron_dropout=args.network_dropout, **net_kwargs)
        train_unet = not args.network_train_text_encoder_only
        train_text_encoder = not args.network_train_unet_only
        network.apply_to(text_encoders, unet, train_text_encoder, train_unet)
        if args.network_weights is not None:
            network.load_weights(args.network_weights)
            logger.info("load network weights from %s", args.network_weights)
        for model in list(text_encoders) + [unet, vae]:
            for p in model.get_parameters():
                p.requires_grad = False
        param_groups, lr_descriptions = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr,
                                                                         args.learning_rate)
        if not param_groups:
            raise UserError("no trainable LoRA parameters (all learning rates are 0?)")
        params = [p for g in param_groups for p in g["params"]]
        if args.full_fp16 or args.full_bf16:  # LoRA weights (and so the optimizer state) in half precision too
            for p in params:
                p.set_dtype(weight_dtype)
        self.dp.broadcast_parameters(params)  # the same initial LoRA weights on every rank
        loss_net = self.build_loss_net(args, text_encoders, unet)  # may rename parameters: before the optimizer
        if args.cache_text_encoder_outputs and not args.sample_prompts:
            text_encoders = []  # not used again: dropped (the LoRA network keeps no reference to them)
            release_host_memory()
        optimizer, optimizer_name, optimizer_args, base_lrs = create_optimizer(args, param_groups)
        optimizer_train_fn, optimizer_eval_fn = get_optimizer_train_eval_fn(optimizer, args)
        at_eval_weights = [False]  # the parameters hold a schedule-free optimizer's x (its eval() was called)

        def use_eval_weights(needed=True):
            """kohya's optimizer_eval_fn() before sampling, validation and saving: a schedule-free optimizer's
            averaged weights x are what is sampled, validated and saved (LoRA and state); training goes on
            from y (``use_train_weights``). kohya switches to x and back after every update; here to x only
            when something is sampled, validated or saved, and back just before the next step, so that all
            the outputs between two steps see one x and y is not rounded by round trips nothing needed."""
            if needed and not at_eval_weights[0]:
                optimizer_eval_fn()
                at_eval_weights[0] = True

        def use_train_weights():
            """kohya's optimizer_train_fn(): back to y before a step (a no-op for other optimizers)."""
            if at_eval_weights[0]:
                optimizer_train_fn()
                at_eval_weights[0] = False

        # steps
        loader = train_util.DataLoader(train_group, shuffle=True, num_workers=args.max_data_loader_n_workers,
                                       persistent_workers=args.persistent_data_loader_workers, seed=args.seed)
        num_batches = len(loader)
        accum = args.gradient_accumulation_steps
        if args.max_train_epochs is not None:
            args.max_train_steps = train_util.max_train_steps_for_epochs(args.max_train_epochs, num_batches, 1, accum)
            logger.info("override steps. steps for %d epochs is: %d", args.max_train_epochs, args.max_train_steps)
        if args.max_train_steps < 1:
            raise UserError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
        train_group.set_max_train_steps(args.max_train_steps)
        num_update_steps_per_epoch = train_util.num_update_steps_per_epoch(num_batches, accum)
        num_train_epochs = train_util.num_train_epochs(args.max_train_steps, num_batches, accum)
        if args.save_n_epoch_ratio is not None:  # kohya: at least N files over the run
            args.save_every_n_epochs = math.floor(num_train_epochs / args.save_n_epoch_ratio) or 1
        schedule = self.dp.lr_schedule(create_lr_schedule(args, base_lrs, args.max_train_steps, optimizer=optimizer,
                                                          num_processes=self.dp.world_size))
        noise_schedule = ctf.NoiseSchedule(zero_terminal_snr=args.zero_terminal_snr)

        # compiled cells
        cells = _step_cells()
        scaler = DynamicLossScaler() if args.mixed_precision == "fp16" else None
        loss_scale = None if scaler is None else scaler.parameter
        chain = None
        dropouts = [name for name in ("dropout", "rank_dropout", "module_dropout")
                    if any(getattr(lora, name, None) for lora in network.loras)]
        if args.gradient_checkpointing and dropouts:
            logger.warning("gradient checkpointing: LoRA %s would draw other masks when a segment is recomputed; "
                           "training with the one-graph step instead (no memory saved)", "/".join(dropouts))
        elif args.gradient_checkpointing:  # the loss as a chain of segments, recomputed one at a time
            from library.segments import SegmentChain

            chain = SegmentChain(loss_net.segments(), loss_net.input_names, params)
            logger.info("gradient checkpointing: %d segments, %d compiled graphs", len(chain.segments),
                        chain.num_graphs)
        if accum == 1 and scaler is None:
            if chain is None:
                step_cell = cells["TrainStep"](loss_net, params, optimizer, args.max_grad_norm,
                                               self.dp.step_reducer(params))
            elif ParameterwiseUpdate.supports(optimizer, self.dp.step_reducer(params), accum, loss_scale):
                step_cell = SegmentedStep(chain, ParameterwiseUpdate(optimizer, args.max_grad_norm))
            else:
                step_cell = SegmentedStep(chain, cells["ApplyGrads"](optimizer, args.max_grad_norm,
                                                                      self.dp.step_reducer(params)))
            apply_cell = None
        else:  # fp16 goes this way too: gradients unscaled into fp32 buffers, the update skipped on overflow
            buffers = ParameterTuple(params).clone(prefix="grad_accum", init="zeros")
            if chain is None:
                step_cell = cells["AccumulateStep"](loss_net, params, buffers, accum, self.dp.step_reducer(params),
                                                    loss_scale=loss_scale)
            else:
                step_cell = SegmentedStep(chain, cells["AccumulateGrads"](buffers, accum, self.dp.step_reducer(params),
                                                                          loss_scale=loss_scale),
                                          loss_scale=loss_scale)
            apply_cell = cells["ApplyAccumulated"](buffers, optimizer, args.max_grad_norm,
                                                   self.dp.step_reducer(params), skip_non_finite=scaler is not None)

        def lr_position():  # accelerate does not step the LR scheduler when GradScaler skipped the update
            return global_step - lr_offset - (scaler.skipped_steps if scaler is not None else 0)

        def set_train_modes():
            step_cell.set_train(True)
            for te in text_encoders:
                te.set_train(train_text_encoder)
            unet.set_train(True)

        set_train_modes()
        eval_net = loss_net if chain is None else SegmentedLoss(chain)  # validation: the step's own forward
        validator = self.make_validator(args, val_group, eval_net, vae, noise_schedule, set_train_modes)

        # metadata
        make_output_folder(args.output_dir, "--output_dir")
        num_train_images = sum(d.num_train_images for d in train_group.datasets)
        num_reg_images = sum(d.num_reg_images for d in train_group.datasets)
        dataset_md = {
            "ss_num_train_images": num_train_images, "ss_num_reg_images": num_reg_images,
            "ss_num_batches_per_epoch": num_batches, "ss_num_epochs": num_train_epochs,
            "ss_batch_size_per_device": args.train_batch_size,
            "ss_total_batch_size": args.train_batch_size * self.dp.world_size * accum,
            "ss_network_module": args.network_module, "ss_network_dim": args.network_dim,
            "ss_network_alpha": args.network_alpha, "ss_network_dropout": args.network_dropout,
            "ss_lr_warmup_steps": args.lr_warmup_steps, "ss_lr_scheduler": args.lr_scheduler,
            "ss_max_train_steps": args.max_train_steps, "ss_seed": args.seed,
            "ss_training_comment": args.training_comment, "ss_mixed_precision": args.mixed_precision,
            "ss_num_validation_images": sum(d.num_train_images for d in val_group.datasets) if val_group else 0,
            "ss_validation_seed": args.validation_seed, "ss_validation_split": args.validation_split,
            "ss_max_validation_steps": args.max_validation_steps,
            "ss_validate_every_n_epochs": args.validate_every_n_epochs,
            "ss_validate_every_n_steps": args.validate_every_n_steps,
        }
        dataset_md.update(lora_metadata.dataset_metadata(args, train_group, dataset_md["ss_total_batch_size"]))
        metadata = lora_metadata.build_training_metadata(
            args, session_id=session_id, training_started_at=training_started_at,
            text_encoder_lr=lora_metadata.text_encoder_lr_value(args.text_encoder_lr),
            optimizer_name=optimizer_name, optimizer_args=optimizer_args, model_version=model_version,
            network_kwargs=net_kwargs, dataset_metadata=dataset_md)
        minimum_metadata = lora_metadata.minimum_metadata(metadata)
        ext = "." + (args.save_model_as or "safetensors")

        def save_model(ckpt_name, steps, epoch_no, force_sync_upload=False):
            path = os.path.join(args.output_dir, ckpt_name)
            md = dict(metadata)
            md["ss_training_finished_at"] = str(time.time())
            md["ss_steps"] = str(steps)
            md["ss_epoch"] = str(epoch_no)
            md.update(lora_metadata.get_sai_model_spec(args, sdxl=self.is_sdxl, lora=True))
            md_to_save = lora_metadata.minimum_metadata(md) if args.no_metadata else md
            for p in params:
                if not np.all(np.isfinite(p.asnumpy())):
                    raise UserError(f"LoRA weights contain NaN/inf at step {steps}: not saving {path}")
            logger.info("saving checkpoint: %s", path)
            network.save_weights(path, args.save_precision, md_to_save)

        def remove_model(name):
            path = os.path.join(args.output_dir, name)
            if os.path.exists(path):
                logger.info("removing old checkpoint: %s", path)
                os.remove(path)

        del minimum_metadata
        logger.info("running training: %d images (%d reg), %d batches/epoch, %d epochs, %d steps, accumulation %d",
                    num_train_images, num_reg_images, num_batches, num_train_epochs, args.max_train_steps, accum)
        logger.info("lr groups: %s", ", ".join(f"{d or 'all'}={lr}" for d, lr in zip(lr_descriptions, base_lrs)))

        tracker = train_logging.TrainLogger(args, self.log_with)
        rng = np.random.default_rng(args.seed)
        min_t = 0 if args.min_timestep is None else args.min_timestep
        max_t = 1000 if args.max_timestep is None else args.max_timestep
        progress = tqdm(range(args.max_train_steps), smoothing=0, desc="steps", dynamic_ncols=True,
                        disable=not self.dp.is_main)
        global_step = 0
        losses, loss_rows, val_rows = [], [], []
        micro = 0
        step_times = []
        compile_times = {}
        loss_recorder_window = []

        def sampling(epoch_no, step):
            return sampler.enabled and should_sample(args, epoch_no, step)

        def run_update_bookkeeping(loss_value, step_seconds):
            nonlocal global_step
            global_step += 1
            progress.update(1)
            losses.append(loss_value)
            loss_recorder_window.append(loss_value)
            avr = sum(loss_recorder_window[-num_update_steps_per_epoch:]) / len(
                loss_recorder_window[-num_update_steps_per_epoch:])
            loss_rows.append((global_step, loss_value, avr, schedule.lrs(lr_position() - 1)[0]))
            postfix = dict(avr_loss=f"{avr:.4f}", loss=f"{loss_value:.4f}", s_step=f"{step_seconds:.2f}")
            keys_scaled = mean_norm = max_norm = None
            if args.scale_weight_norms:
                keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(args.scale_weight_norms)
                postfix.update(keys_scaled=keys_scaled, avg_norm=f"{mean_norm:.4f}")
            progress.set_postfix(**postfix)
            if not math.isfinite(loss_value):
                raise UserError(f"loss is {loss_value} at step {global_step}: stopping (no LoRA saved for it)")
            tracker.log(train_logging.step_logs(args, loss_value, avr, schedule.lrs(lr_position() - 1), lr_descriptions,
                                                keys_scaled, mean_norm, max_norm), global_step)
            validate = train_validation.should_validate_step(args, global_step, validator.has_data)
            save = args.save_every_n_steps is not None and global_step % args.save_every_n_steps == 0
            use_eval_weights(sampling(None, global_step) or validate or save)
            sampler.sample(None, global_step)  # --sample_every_n_steps
            if validate:
                val_loss = validator.run("validation steps")
                val_rows.append((global_step, epoch + 1, val_loss))
                tracker.log({"loss/validation/step_average": val_loss,
                             "loss/validation/step_divergence": val_loss - avr}, global_step)
            if save:
                save_model(get_step_ckpt_name(args, ext, global_step), global_step, epoch + 1)
                if args.save_last_n_steps is not None:  # kohya's get_remove_step_no
                    remove_no = global_step - args.save_last_n_steps - 1
                    remove_no -= remove_no % args.save_every_n_steps
                    if remove_no > 0:
                        remove_model(get_step_ckpt_name(args, ext, remove_no))
                if args.save_state:
                    save_train_state(train_state.STEP_STATE_NAME.format(args.output_name, global_step))
                    last_n = args.save_last_n_steps_state or args.save_last_n_steps
                    if last_n is not None:
                        remove_no = global_step - last_n - 1
                        remove_no -= remove_no % args.save_every_n_steps
                        if remove_no > 0:
                            train_state.remove_state(os.path.join(
                                args.output_dir, train_state.STEP_STATE_NAME.format(args.output_name, remove_no)))

        state_params = params + train_state.optimizer_state_parameters(optimizer, params)
        rng_streams = {"noise": rng, "vae": getattr(vae_encode, "rng", None)}
        n_in_epoch = 0

        def save_train_state(name):
            state = {"current_step": global_step, "current_epoch": epoch + (n_in_epoch >= num_batches),
                     "position": n_in_epoch % num_batches, "rng": train_state.capture_rng(rng_streams),
                     "losses": losses, "loss_rows": loss_rows, "val_rows": val_rows,
                     "loss_scaler": None if scaler is None else scaler.state(), "max_train_steps": args.max_train_steps,
                     "num_batches": num_batches, "seed": args.seed, "lr_offset": lr_offset}
            logger.info("saving state: %s", name)
            train_state.save_state(os.path.join(args.output_dir, name), state_params, state)

        start_epoch, start_position, resumed = 0, 0, None
        lr_offset = 0  # kohya: --initial_step/--initial_epoch do not move the LR schedule (it starts at step 0)
        if args.resume is not None:
            resumed = self.resume_state
            if resumed["num_batches"] != num_batches or resumed["seed"] != args.seed:
                raise UserError(f"--resume {args.resume}: the state was saved with {resumed['num_batches']} batches "
                                f"per epoch and seed {resumed['seed']}; this run has {num_batches} and {args.seed} "
                                "(resume with the same dataset, batch size and --seed)")
            train_state.load_parameters(args.resume, state_params)
            at_eval_weights[0] = True  # states are saved at a schedule-free optimizer's eval weights, as kohya's
            global_step = int(resumed["current_step"])
            lr_offset = int(resumed.get("lr_offset", 0))  # a run started with --skip_until_initial_step
            start_epoch, start_position = int(resumed["current_epoch"]), int(resumed["position"])
            losses.extend(float(x) for x in resumed["losses"])
            loss_recorder_window.extend(losses)
            loss_rows.extend(tuple(r) for r in resumed["loss_rows"])
            val_rows.extend(tuple(r) for r in resumed.get("val_rows", []))
            if scaler is not None and resumed.get("loss_scaler"):
                scaler.load_state(resumed["loss_scaler"])
            progress.update(global_step)
            loader.start_at(start_epoch, start_position)
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", args.resume, global_step,
                        start_epoch + 1, start_position)

        initial = train_util.check_initial_step(args, num_batches, accum)
        if initial is not None and initial > 0:
            start_epoch = initial // num_update_steps_per_epoch
            if args.skip_until_initial_step:  # kohya: the batches before it are skipped, the step count goes on
                start_position = (initial % num_update_steps_per_epoch) * accum
                global_step = lr_offset = initial
                progress.update(global_step)
                logger.info("skipping %d steps (epoch %d, batch %d)", initial, start_epoch + 1, start_position)
            else:  # kohya: only the epochs before the initial step's epoch are left out; steps count from 0
                logger.info("starting at epoch %d (--initial_step %d)", start_epoch + 1, initial)
            loader.start_at(start_epoch, start_position)

        from library.train_sampling import TrainingSampler

        sampler = TrainingSampler(args, text_encoders, vae, unet, self.dp.rank, self.dp.world_size)  # sizes checked
        use_eval_weights(sampling(0, global_step))
        sampler.sample(0, global_step)  # --sample_at_first (kohya passes epoch 0)
        epoch = start_epoch
        optimizer.set_lrs(schedule.lrs(lr_position()))
        micro_losses = []
        logger.info("host memory before the first step: %.2f GB", rss_gb() or 0.0)
        steps_measured = reset_peak_rss()  # the steps' peak memory, without the loading before them
        t_update = time.perf_counter()
        for epoch in range(start_epoch, num_train_epochs):
            if global_step >= args.max_train_steps:
                break
            network.on_epoch_start(text_encoders, unet)
            loader.current_epoch.value = epoch + 1
            train_group.set_current_epoch(epoch + 1)
            n_in_epoch = start_position if epoch == start_epoch else 0  # resumed or skipped batches
            if resumed is not None:  # the state's generators, after the epoch's bucket shuffle (kohya's seed+epoch)
                train_state.restore_rng(resumed["rng"], rng_streams)
                resumed = None
            for batch in loader:
                loader.current_step.value = global_step
                n_in_epoch += 1
                latents = batch["latents"]
                if latents is None:
                    latents = np.concatenate([vae_encode(batch["images"][i:i + args.vae_batch_size])
                                              for i in range(0, len(batch["images"]), args.vae_batch_size)])
                latents = (latents * self.vae_scale_factor).astype(np.float32)
                latents = self.dp.global_rows(batch, latents)  # data parallel: draw for the global batch
                b = latents.shape[0]
                noise, noisy_noise, timesteps = ctf.draw_noise(args, latents, rng,
                                                               lambda r: r.integers(min_t, max_t, size=(b,)))
                latents, noise, noisy_noise, timesteps = self.dp.local_rows(batch, latents, noise, noisy_noise,
                                                                            timesteps)
                weights = (np.asarray(batch["loss_weights"], np.float32)
                           * ctf.post_process_loss_weights(args, timesteps, noise_schedule)).astype(np.float32)
                inputs = self.step_inputs(args, batch, latents, noise, noisy_noise, timesteps, weights,
                                          noise_schedule)
                key = tuple(latents.shape)
                if self.dynamic_shapes and not compile_times:
                    from mindspore import Tensor as _T
                    step_cell.set_inputs(*[_T(shape=[None] * x.ndim, dtype=x.dtype) for x in inputs])
                    key = "dynamic"
                elif self.dynamic_shapes:
                    key = "dynamic"
                use_train_weights()
                t0 = time.perf_counter()
                loss = float(step_cell(*inputs).asnumpy())
                dt = time.perf_counter() - t0
                if key not in compile_times:
                    compile_times[key] = dt
                    logger.info("compiled the step for latents %s in %.1f s", key, dt)
                micro_losses.append(loss)
                micro += 1
                last_in_epoch = n_in_epoch == num_batches
                if apply_cell is None or micro % accum == 0 or last_in_epoch:
                    if apply_cell is not None:
                        finite = bool(apply_cell().asnumpy())
                        if scaler is not None:
                            scaler.update(found_inf=not finite)
                            if not finite:
                                logger.info("step %d: inf/NaN gradients at loss scale %g: update skipped, scale %g",
                                            global_step + 1, scaler.scale / scaler.backoff_factor, scaler.scale)
                    micro = 0
                    step_loss = sum(micro_losses) / len(micro_losses)
                    micro_losses = []
                    now = time.perf_counter()
                    step_seconds = now - t_update
                    t_update = now
                    if key in compile_times and compile_times[key] != dt:
                        step_times.append(step_seconds)
                    run_update_bookkeeping(step_loss, step_seconds)
                    optimizer.set_lrs(schedule.lrs(lr_position()))
                    if global_step >= args.max_train_steps:
                        break
            epoch_avr = None
            if n_in_epoch:
                epoch_avr = sum(losses[-num_update_steps_per_epoch:]) / len(losses[-num_update_steps_per_epoch:])
                tracker.log({"loss/epoch_average": epoch_avr}, epoch + 1)
            validate = bool(n_in_epoch) and train_validation.should_validate_epoch(args, epoch + 1, validator.has_data)
            save = args.save_every_n_epochs is not None and (epoch + 1) % args.save_every_n_epochs == 0 \
                and (epoch + 1) < num_train_epochs
            use_eval_weights(validate or save or sampling(epoch + 1, global_step))
            if validate:
                val_loss = validator.run("epoch validation steps")
                val_rows.append((global_step, epoch + 1, val_loss))
                logger.info("epoch %d: validation loss %.6f", epoch + 1, val_loss)
                tracker.log({"loss/validation/epoch_average": val_loss,
                             "loss/validation/epoch_divergence": val_loss - epoch_avr}, epoch + 1)
            if save:
                save_model(get_epoch_ckpt_name(args, ext, epoch + 1), global_step, epoch + 1)
                if args.save_last_n_epochs is not None:
                    remove_epoch_no = epoch + 1 - args.save_every_n_epochs * args.save_last_n_epochs
                    if remove_epoch_no > 0:
                        remove_model(get_epoch_ckpt_name(args, ext, remove_epoch_no))
                if args.save_state:
                    save_train_state(train_state.EPOCH_STATE_NAME.format(args.output_name, epoch + 1))
                    last_n = args.save_last_n_epochs_state or args.save_last_n_epochs
                    if last_n is not None:
                        remove_epoch_no = epoch + 1 - args.save_every_n_epochs * last_n
                        if remove_epoch_no > 0:
                            train_state.remove_state(os.path.join(args.output_dir, train_state.EPOCH_STATE_NAME.format(
                                args.output_name, remove_epoch_no)))
            sampler.sample(epoch + 1, global_step)  # --sample_every_n_epochs
        progress.close()
        loader.close()

        use_eval_weights()  # kohya: the LoRA and the state at the end hold the eval weights too
        save_model(get_last_ckpt_name(args, ext), global_step, num_train_epochs)
        if args.save_state or args.save_state_on_train_end:
            save_train_state(train_state.LAST_STATE_NAME.format(args.output_name))
        tracker.close()
        csv_path = os.path.join(args.output_dir, f"{args.output_name}_loss.csv")
        with open(csv_path + ".tmp", "w", encoding="utf-8") as f:
            f.write("step,loss,avr_loss,lr\n")
            for row in loss_rows:
                f.write(f"{row[0]},{row[1]:.8g},{row[2]:.8g},{row[3]:.8g}\n")
        os.replace(csv_path + ".tmp", csv_path)
        if val_rows:
            val_path = os.path.join(args.output_dir, f"{args.output_name}_val_loss.csv")
            with open(val_path + ".tmp", "w", encoding="utf-8") as f:
                f.write("step,epoch,val_loss\n")
                for row in val_rows:
                    f.write(f"{row[0]},{row[1]},{row[2]:.8g}\n")
            os.replace(val_path + ".tmp", val_path)
        write_loss_curve_png(os.path.join(args.output_dir, f"{args.output_name}_loss.png"), losses)
        summary = {"steps": global_step, "epochs": num_train_epochs,
                   "compile_s": {(k if isinstance(k, str) else "x".join(map(str, k))): round(v, 2) for k, v in compile_times.items()},
                   "s_per_step": round(sum(step_times) / len(step_times), 4) if step_times else None,
                   "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                   "steps_peak_rss_gb": round(peak_rss_gb(), 2) if steps_measured else None}
        if chain is not None:
            summary["num_graphs"] = chain.num_graphs
        if isinstance(step_cell, SegmentedStep) and step_cell.time_breakdown():
            summary["segmented_step_s"] = {k: round(v, 3) for k, v in step_cell.time_breakdown().items()}
        logger.info("training finished: %s", json.dumps(summary))
        print(f"model saved: {os.path.join(args.output_dir, get_last_ckpt_name(args, ext))} "
              f"(loss curve {args.output_name}_loss.png); {json.dumps(summary)}")
        return summary


def check_base_weights(args):
    """--base_weights / --base_weights_multiplier at start: each file exists and holds tensors (whether it fits
    the model is known once the model is loaded: ``merge_base_weights``)."""
    from library.lora_file import load_state_dict_file

    files, multipliers = args.base_weights or [], args.base_weights_multiplier or []
    if multipliers and not files:
        raise UserError("--base_weights_multiplier needs --base_weights (the LoRA files it scales)")
    if len(multipliers) > len(files):  # kohya ignores the extra ones silently
        raise UserError(f"--base_weights_multiplier has {len(multipliers)} values for {len(files)} --base_weights "
                        "file(s): give at most one per file (1 for the files it does not reach)")
    for path in files:
        try:
            tensors = load_state_dict_file(path)[0]
        except UserError as e:
            raise UserError(f"--base_weights {e}") from None
        if not tensors:
            raise UserError(f"--base_weights {path}: holds no tensors")


def merge_base_weights(files, multipliers, text_encoders, vae, unet):
    """kohya's --base_weights: each LoRA file merged into the models' weights (W += multiplier * up@down *
    alpha/dim, the inference merge of ``networks.lora``; a LoHa file through ``networks.loha``), with
    ``multipliers[i]``, or 1 where the list does not reach. Every file is checked against the models before
    the first is merged, so a file that does not fit stops the run with the models untouched."""
    from networks.network_base import create_network_from_weights_file as create_network_from_weights

    multipliers = list(multipliers or [])
    todo = []
    for i, path in enumerate(files):
        multiplier = float(multipliers[i]) if i < len(multipliers) else 1.0
        try:
            network, weights_sd = create_network_from_weights(multiplier, path, vae, list(text_encoders), unet,
                                                              for_inference=True)
        except UserError as e:
            raise UserError(f"--base_weights {e}") from None
        todo.append((path, multiplier, network, weights_sd))
    for path, multiplier, network, weights_sd in todo:
        logger.info("merging module: %s with multiplier %s", path, multiplier)
        network.merge_to(list(text_encoders), unet, weights_sd)
    logger.info("all weights merged: %s", ", ".join(files))


def main(argv=None, trainer_cls=None):
    from library.train_logging import setup_logging

    setup_logging()  # INFO on stderr until the arguments say otherwise
    if trainer_cls is None:
        raise UserError("train_network.py trains SD 1.x/2.x networks, which this port does not implement yet: "
                        "use sdxl_train_network.py")
    parser = setup_parser()
    trainer = trainer_cls()
    if hasattr(trainer, "add_arguments"):
        trainer.add_arguments(parser)
    args = parse_args(parser, argv)
    setup_logging(args)  # --console_log_level/--console_log_file/--console_log_simple (kohya's setup_logging)
    if args.output_config:  # kohya: write the arguments to the config file and stop
        from library.train_args import write_output_config

        logger.info("Saved config file: %s", write_output_config(args, parser))
        return
    trainer.train(args, parser)


if __name__ == "__main__":
    from library.device_utils import run_main

    run_main(main)
