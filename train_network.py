"""kohya's ``train_network.py``: ``NetworkTrainer``, the generic LoRA training loop.

Model-specific parts (loading, tokenizers, the loss cell that conditions and
calls the UNet, the batch -> step inputs) are methods that
``sdxl_train_network.SdxlNetworkTrainer`` provides; this file holds the
hooks, the argument checks and ``train``, which runs the stages of one run in
order on a ``TrainRun`` (set-up: library/train_run.py; loop, saving and the
end: library/train_loop.py).

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
backend the dynamic-shape step is several times slower per step
(Limitations.md), so per-shape compilation is the default;
``KOHYA_MS_DYNAMIC_SHAPES=1`` switches to one dynamic compile (experimental,
worth re-measuring on Ascend).

Arguments (library/train_args.py): kohya's names and defaults. An argument that
this port does not implement yet stops the run at start with one line naming it
(see ``NOT_IMPLEMENTED``) when it is given a non-default value. The step cells
are in library/train_step.py, output names and the loss curve in
library/train_outputs.py.
"""
from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import library  # noqa: E402,F401  (sets the CPU runtime env before mindspore loads)
from library import train_util  # noqa: E402
from library.base_weights import check_base_weights, merge_base_weights  # noqa: E402,F401
from library.device_utils import UserError  # noqa: E402
from library.path_utils import check_output_folder  # noqa: E402
from library.train_args import (NOT_IMPLEMENTED, check_not_implemented, parse_args, setup_parser,  # noqa: E402,F401
                                text_encoder_lrs)
from library.train_loop import LoopStages  # noqa: E402
from library.train_run import SetupStages, TrainRun  # noqa: E402,F401
from library.train_step import _build_step_cells  # noqa: E402,F401  (the tests' import path)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# trainer

class NetworkTrainer(SetupStages, LoopStages):
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

    def load_target_model(self, args, with_unet=True):
        """-> (model_version, text_encoders list, vae, unet); ``unet`` is None with ``with_unet=False``
        (``load_unet`` reads it later)."""
        raise NotImplementedError

    def load_unet(self, args):
        """-> the U-Net alone, as ``load_target_model`` loads it."""
        raise NotImplementedError

    def build_loss_net(self, args, text_encoders, unet):
        """-> a Cell taking ``step_inputs(...).flat(cell.input_names)`` and returning the scalar loss."""
        raise NotImplementedError

    def cache_text_encoder_outputs(self, args, text_encoders, dataset_groups):
        """--cache_text_encoder_outputs: every caption's text encoder outputs into the datasets."""
        raise UserError("--cache_text_encoder_outputs is not supported by this trainer")

    def step_inputs(self, args, batch, latents, noise, noisy_noise, timesteps, weights, noise_schedule):
        """-> the model family's named step inputs, whose ``flat(input_names)`` gives the loss cell's
        positional arguments (``sdxl_train_network.SdxlStepInputs``)."""
        raise NotImplementedError

    def make_validator(self, args, val_group, loss_net, vae, noise_schedule, set_train_modes, input_names):
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
            return self.step_inputs(args, batch, latents, noise, noisy_noise, timesteps, weights,
                                    noise_schedule).flat(input_names)

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
        """kohya's train(): the stages in order (``library.train_run.SetupStages``, then
        ``library.train_loop.LoopStages``) on one ``TrainRun``. -> the run's summary (None with --debug_dataset)."""
        run = self.start_run(args, parser or setup_parser())
        if not self.prepare_datasets(run):
            return None  # --debug_dataset: kohya returns before any model work
        self.prepare_models(run)
        self.cache_inputs(run)
        param_groups = self.build_network(run)
        self.build_optimizer(run, param_groups)
        self.plan_steps(run)
        self.build_step(run)
        self.prepare_outputs(run)
        self.restore_position(run)
        self.run_epochs(run)
        return self.finish(run)


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
