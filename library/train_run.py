"""One training run of ``train_network.NetworkTrainer``: ``TrainRun``, what the stages share, and
``SetupStages``, the stages that make the run before the loop. ``NetworkTrainer.train`` calls, in order:

    start_run -> prepare_datasets -> prepare_models -> cache_inputs -> build_network -> build_optimizer
    -> plan_steps -> build_step -> prepare_outputs -> restore_position     (here)
    -> run_epochs (run_batch, run_update, after_update, end_epoch) -> finish     (library/train_loop.py)

The model-specific hooks (``load_target_model``, ``build_loss_net``, ``step_inputs``, ...) are the
trainer's (``sdxl_train_network.SdxlNetworkTrainer``); the stages call them. A stage reads and writes the
run's fields.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from library import config_util, train_util
from library.device_utils import UserError, release_host_memory, rss_gb
from library.path_utils import make_output_folder
from library.train_step import ParameterwiseUpdate, SegmentedLoss, SegmentedStep, _step_cells

# the trainer's messages keep the logger name users see on the console ("INFO train_network: ...")
logger = logging.getLogger("train_network")


@dataclass
class TrainRun:
    """What the stages of one run share. Filled stage by stage (None until the stage that makes it)."""

    args: Any
    target: str = ""  # the device target (CPU, GPU, Ascend)
    session_id: int = 0
    training_started_at: float = 0.0
    # datasets
    tokenizers: Any = None
    train_group: Any = None
    val_group: Any = None
    # models
    model_version: str = ""
    text_encoders: list = field(default_factory=list)
    vae: Any = None
    unet: Any = None
    weight_dtype: Any = None
    vae_encode: Any = None  # None with --cache_latents
    # network and optimizer
    network: Any = None
    params: list = field(default_factory=list)
    lr_descriptions: list = field(default_factory=list)
    train_text_encoder: bool = False
    loss_net: Any = None
    optimizer: Any = None
    optimizer_name: str = ""
    optimizer_args: str = ""
    base_lrs: list = field(default_factory=list)
    optimizer_train_fn: Any = None
    optimizer_eval_fn: Any = None
    at_eval_weights: bool = False  # the parameters hold a schedule-free optimizer's x (its eval() was called)
    # step plan
    loader: Any = None
    num_batches: int = 0
    accum: int = 1
    num_update_steps_per_epoch: int = 0
    num_train_epochs: int = 0
    schedule: Any = None
    noise_schedule: Any = None
    # compiled step
    scaler: Any = None  # DynamicLossScaler with --mixed_precision fp16
    chain: Any = None  # SegmentChain with --gradient_checkpointing
    step_cell: Any = None
    apply_cell: Any = None  # None when the step cell updates the parameters itself
    validator: Any = None
    # outputs
    metadata: dict = field(default_factory=dict)
    ext: str = ".safetensors"
    tracker: Any = None
    sampler: Any = None
    progress: Any = None
    state_params: list = field(default_factory=list)
    # the loop
    rng: Any = None  # the noise and timestep generator
    rng_streams: dict = field(default_factory=dict)
    min_t: int = 0
    max_t: int = 1000
    global_step: int = 0
    lr_offset: int = 0  # kohya: --initial_step/--initial_epoch do not move the LR schedule (it starts at step 0)
    epoch: int = 0
    start_epoch: int = 0
    start_position: int = 0
    n_in_epoch: int = 0  # batches of the current epoch done (resumed or skipped ones included)
    resumed: Optional[dict] = None  # the --resume state until its generators are restored
    micro: int = 0  # micro-batches accumulated since the last update
    micro_losses: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    loss_recorder_window: list = field(default_factory=list)
    loss_rows: list = field(default_factory=list)
    val_rows: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    compile_times: dict = field(default_factory=dict)
    t_update: float = 0.0
    steps_measured: bool = False

    def use_eval_weights(self, needed=True):
        """kohya's optimizer_eval_fn() before sampling, validation and saving: a schedule-free optimizer's
        averaged weights x are what is sampled, validated and saved (LoRA and state); training goes on
        from y (``use_train_weights``). kohya switches to x and back after every update; here to x only
        when something is sampled, validated or saved, and back just before the next step, so that all
        the outputs between two steps see one x and y is not rounded by round trips nothing needed."""
        if needed and not self.at_eval_weights:
            self.optimizer_eval_fn()
            self.at_eval_weights = True

    def use_train_weights(self):
        """kohya's optimizer_train_fn(): back to y before a step (a no-op for other optimizers)."""
        if self.at_eval_weights:
            self.optimizer_train_fn()
            self.at_eval_weights = False

    def lr_position(self):  # accelerate does not step the LR scheduler when GradScaler skipped the update
        return self.global_step - self.lr_offset - (self.scaler.skipped_steps if self.scaler is not None else 0)

    def set_train_modes(self):
        self.step_cell.set_train(True)
        for te in self.text_encoders:
            te.set_train(self.train_text_encoder)
        self.unet.set_train(True)

    def sampling(self, epoch_no, step):
        from library.train_sampling import should_sample

        return self.sampler.enabled and should_sample(self.args, epoch_no, step)


class SetupStages:
    """The stages before the loop (see the module docstring); mixed into the trainer, whose hooks they
    call and whose ``dp`` (``library.distributed``) they set up and use."""

    # -- setting up --------------------------------------------------------------------------
    def start_run(self, args, parser):
        """Arguments checked, the device and the distributed job set up, the seeds set: a new ``TrainRun``."""
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

        from library.run_args import RunArgs

        run = TrainRun(args=RunArgs(args), target=target, session_id=random.randint(0, 2 ** 32),
                       training_started_at=time.time())
        if args.seed is None:  # kohya draws one (a data-parallel job has drawn it on rank 0 and shared it)
            run.args.derive(seed=random.randint(0, 2 ** 32 - 1))
        seed = run.args.seed
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        ms.set_seed(seed % (2 ** 31))
        return run

    def prepare_datasets(self, run):
        """Tokenizers and dataset groups, checked and scanned. -> False with --debug_dataset (kohya prints
        the batches and returns before any model work)."""
        args = run.args
        run.tokenizers = self.load_tokenizers(args)
        train_group, val_group = config_util.build_dataset_groups(args, run.tokenizers,
                                                                  batch_size_multiplier=self.dp.world_size)
        if args.cache_info and not any(isinstance(d, train_util.DreamBoothDataset) for d in train_group.datasets):
            raise UserError("--cache_info caches the image sizes and captions of DreamBooth subsets (image_dir "
                            "without metadata_file); this dataset has none: remove it")
        if args.debug_dataset:
            train_util.debug_dataset(train_group)
            if val_group is not None:
                train_util.debug_dataset(val_group)
            logger.info("--debug_dataset: stopping without training")
            return False
        self.dp.shard_dataset_group(train_group)  # each rank loads its part of every global batch
        train_util.verify_dataset_args(args, train_group, val_group, args.network_train_unet_only)
        self.assert_extra_args(args, train_group)
        train_util.scan_dataset_group(train_group)
        if val_group is not None:
            self.assert_extra_args(args, val_group)
            train_util.scan_dataset_group(val_group)
        # the initial step against the steps, now that the batches per epoch are known (before the model load)
        train_util.check_initial_step(args, len(train_group), args.gradient_accumulation_steps)
        run.train_group, run.val_group = train_group, val_group
        return True

    def prepare_models(self, run):
        """The checkpoint loaded (``load_target_model``), --base_weights merged, the frozen models cast to the
        mixed precision, the U-Net's attention and checkpointing set (``prepare_unet``).

        When the text encoders are needed only to fill the text-encoder output cache, the U-Net is read
        after the caching (``cache_inputs``), once they are freed: the two never share the memory."""
        import mindspore as ms

        args = run.args
        with_unet = not self.unet_after_caching(args)
        run.model_version, run.text_encoders, run.vae, run.unet = self.load_target_model(args, with_unet=with_unet)
        text_encoders, unet = run.text_encoders, run.unet
        if args.base_weights:  # computed in fp32 before the models go to half precision (kohya: merged, then cast;
            # a U-Net read in fp16 by --fp16_unet_weights gets the fp32 sum rounded to fp16). kohya merges after
            # caching the text encoder outputs, so a base LoRA's text encoder part never reaches cached outputs;
            # here it is merged first, and the cache holds the model that is trained
            from library.base_weights import merge_base_weights

            merge_base_weights(args.base_weights, args.base_weights_multiplier, text_encoders, run.vae, unet)
        run.weight_dtype = {"no": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[args.mixed_precision]
        if run.weight_dtype != ms.float32:  # frozen models in half precision (before LoRA wraps their layers)
            from library.clip_text_model import cast_params

            for te in text_encoders:
                cast_params(te, run.weight_dtype)
        if unet is not None:
            self.prepare_unet(run)

    @staticmethod
    def unet_after_caching(args):
        """Whether the U-Net is read after the caches are filled: the text encoders are dropped then (their
        outputs cached, no sample prompts to encode) and nothing before needs the U-Net (--base_weights are
        merged into all models at once; --network_weights may hold text encoder modules that are checked
        against the text encoders)."""
        return bool(args.cache_text_encoder_outputs and not args.sample_prompts and not args.base_weights
                    and not args.network_weights)

    def prepare_unet(self, run):
        """The U-Net cast to the mixed precision (or fp16 storage), its attention and checkpointing set."""
        import mindspore as ms

        args, unet = run.args, run.unet
        if run.weight_dtype != ms.float32:
            unet.to_dtype(run.weight_dtype)
        if args.fp16_unet_weights:  # checked in verify_args: --mixed_precision no
            unet.to_dtype(ms.float16, compute_dtype=ms.float32)
            release_host_memory()  # the fp32 weights just freed
        from library.attention import attention_impl_for_flags

        attention_impl = attention_impl_for_flags(vars(args), run.target)  # --mem_eff_attn/--xformers/--sdpa/...
        if attention_impl:
            logger.info(f"U-Net attention: {attention_impl}")
            unet.set_attention_impl(attention_impl)
        if args.gradient_checkpointing:
            unet.set_gradient_checkpointing(True)

    def cache_inputs(self, run):
        """--cache_latents (else the VAE encoder the loop uses) and --cache_text_encoder_outputs."""
        from library.latent_cache import make_vae_encode_fn

        args, train_group, val_group = run.args, run.train_group, run.val_group
        if args.cache_latents:
            logger.info("caching latents")
            with self.dp.main_process_first(args.cache_latents_to_disk), self.caching_encoder(run) as encoder:
                for group in (train_group, val_group):  # rank 0 writes the files
                    if group is not None:
                        group.cache_latents(make_vae_encode_fn(run.vae, sample=True, seed=args.seed, encoder=encoder),
                                            args.vae_batch_size, args.cache_latents_to_disk, args.skip_cache_check)
        else:
            run.vae_encode = make_vae_encode_fn(run.vae, sample=True, seed=args.seed + self.dp.rank)  # per rank
        if args.cache_text_encoder_outputs:
            logger.info("caching text encoder outputs")
            with self.dp.main_process_first(args.cache_text_encoder_outputs_to_disk):
                self.cache_text_encoder_outputs(args, run.text_encoders,
                                                [g for g in (train_group, val_group) if g is not None])
        if args.cache_latents and not args.sample_prompts:  # nothing encodes or decodes images any more
            run.vae = None
        if run.unet is None:  # the text encoders' work is done: freed before the U-Net is read
            self.draw_text_encoder_modules(run)
            run.text_encoders = []
            release_host_memory()
            run.unet = self.load_unet(args)
            self.prepare_unet(run)
        release_host_memory()  # what loading and caching freed, before the step is compiled
        logger.info("host memory after loading and caching: %.2f GB", rss_gb() or 0.0)

    def caching_encoder(self, run):
        """What encodes the images for latent caching: on CPU a child process (``vae_encode_process``: the
        encoding's graph memory would stay under the training steps), elsewhere and in distributed runs the
        VAE in this process."""
        import contextlib

        from library.latent_cache import in_process_encoder
        from library.vae_encode_process import EncoderProcess

        if run.target == "CPU" and self.dp.world_size == 1:
            return EncoderProcess(run.vae)
        return contextlib.nullcontext(in_process_encoder(run.vae))  # one compiled encoder for both groups

    def draw_text_encoder_modules(self, run):
        """The network's modules draw their initial values from one generator in creation order, the text
        encoders' modules first. When the text encoders are gone before ``build_network`` (the U-Net read after
        the caching), a network over the text encoders alone makes those draws here, so that the U-Net's
        modules start from the values they get when every model is loaded at once: the seed gives one LoRA."""
        args = run.args
        logging.disable(logging.INFO)  # its creation messages would describe a network that is not trained
        try:
            self.network_module.create_network(1.0, args.network_dim, args.network_alpha, None, run.text_encoders,
                                               None, neuron_dropout=args.network_dropout, **self.net_kwargs)
        finally:
            logging.disable(logging.NOTSET)

    def build_network(self, run):
        """The network (``--network_module``) applied to the models, its parameters the only trainable ones,
        and the loss cell (``build_loss_net``)."""
        args = run.args
        net_kwargs = self.net_kwargs  # parsed and checked in verify_args
        text_encoders, vae, unet = run.text_encoders, run.vae, run.unet
        if args.dim_from_weights:
            network, _ = self.network_module.create_network_from_weights(1, args.network_weights, vae,
                                                                         text_encoders, unet, **net_kwargs)
        else:
            network = self.network_module.create_network(1.0, args.network_dim, args.network_alpha, vae,
                                                         text_encoders, unet, neuron_dropout=args.network_dropout,
                                                         **net_kwargs)
        train_unet = not args.network_train_text_encoder_only
        run.train_text_encoder = not args.network_train_unet_only
        network.apply_to(text_encoders, unet, run.train_text_encoder, train_unet)
        if args.network_weights is not None:
            network.load_weights(args.network_weights)
            logger.info("load network weights from %s", args.network_weights)
        for model in [m for m in list(text_encoders) + [unet, vae] if m is not None]:
            for p in model.get_parameters():
                p.requires_grad = False
        param_groups, run.lr_descriptions = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr,
                                                                             args.learning_rate)
        if not param_groups:
            raise UserError("no trainable LoRA parameters (all learning rates are 0?)")
        params = [p for g in param_groups for p in g["params"]]
        if args.full_fp16 or args.full_bf16:  # LoRA weights (and so the optimizer state) in half precision too
            for p in params:
                p.set_dtype(run.weight_dtype)
        self.dp.broadcast_parameters(params)  # the same initial LoRA weights on every rank
        run.loss_net = self.build_loss_net(args, text_encoders, unet)  # may rename parameters: before the optimizer
        if args.cache_text_encoder_outputs and not args.sample_prompts:
            # not used again: dropped (the LoRA network keeps no reference to them), this frame's name too,
            # so that the trim below gives their memory back
            text_encoders = run.text_encoders = []
            release_host_memory()
        run.network, run.params = network, params
        return param_groups

    def build_optimizer(self, run, param_groups):
        from library.train_optimizers import create_optimizer, get_optimizer_train_eval_fn, relative_step_overrides

        run.optimizer, run.optimizer_name, run.optimizer_args, run.base_lrs = create_optimizer(run.args, param_groups)
        run.args.derive(**relative_step_overrides(run.args, param_groups))
        run.optimizer_train_fn, run.optimizer_eval_fn = get_optimizer_train_eval_fn(run.optimizer, run.args)

    def plan_steps(self, run):
        """The data loader, the number of steps and epochs, the LR and noise schedules."""
        from library import custom_train_functions as ctf
        from library.train_optimizers import create_lr_schedule

        args = run.args
        run.loader = train_util.DataLoader(run.train_group, shuffle=True, num_workers=args.max_data_loader_n_workers,
                                           persistent_workers=args.persistent_data_loader_workers, seed=args.seed)
        run.num_batches = num_batches = len(run.loader)
        run.accum = accum = args.gradient_accumulation_steps
        if args.max_train_epochs is not None:
            args.derive(max_train_steps=train_util.max_train_steps_for_epochs(args.max_train_epochs, num_batches, 1,
                                                                              accum))
            logger.info("override steps. steps for %d epochs is: %d", args.max_train_epochs, args.max_train_steps)
        if args.max_train_steps < 1:
            raise UserError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
        run.train_group.set_max_train_steps(args.max_train_steps)
        run.num_update_steps_per_epoch = train_util.num_update_steps_per_epoch(num_batches, accum)
        run.num_train_epochs = train_util.num_train_epochs(args.max_train_steps, num_batches, accum)
        if args.save_n_epoch_ratio is not None:  # kohya: at least N files over the run
            args.derive(save_every_n_epochs=math.floor(run.num_train_epochs / args.save_n_epoch_ratio) or 1)
        run.schedule = self.dp.lr_schedule(create_lr_schedule(args, run.base_lrs, args.max_train_steps,
                                                              optimizer=run.optimizer,
                                                              num_processes=self.dp.world_size))
        run.noise_schedule = ctf.NoiseSchedule(zero_terminal_snr=args.zero_terminal_snr)

    def build_step(self, run):
        """The compiled cells: one train step, or (gradient accumulation, fp16 loss scaling) an accumulating
        step and an update; with --gradient_checkpointing a chain of segments. Then the validator."""
        from mindspore import ParameterTuple

        from library.loss_scaler import DynamicLossScaler

        args, params, optimizer, accum = run.args, run.params, run.optimizer, run.accum
        cells = _step_cells()
        run.scaler = DynamicLossScaler() if args.mixed_precision == "fp16" else None
        loss_scale = None if run.scaler is None else run.scaler.parameter
        chain = None
        dropouts = [name for name in ("dropout", "rank_dropout", "module_dropout")
                    if any(getattr(lora, name, None) for lora in run.network.loras)]
        checkpointing = run.unet.gradient_checkpointing  # set from --gradient_checkpointing by prepare_models
        if checkpointing and dropouts:
            logger.warning("gradient checkpointing: LoRA %s would draw other masks when a segment is recomputed; "
                           "training with the one-graph step instead (no memory saved)", "/".join(dropouts))
        elif checkpointing:  # the loss as a chain of segments, recomputed one at a time
            from library.segments import SegmentChain

            chain = SegmentChain(run.loss_net.segments(), run.loss_net.input_names, params)
            logger.info("gradient checkpointing: %d segments, %d compiled graphs", len(chain.segments),
                        chain.num_graphs)
        if accum == 1 and run.scaler is None:
            if chain is None:
                step_cell = cells["TrainStep"](run.loss_net, params, optimizer, args.max_grad_norm,
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
                step_cell = cells["AccumulateStep"](run.loss_net, params, buffers, accum,
                                                    self.dp.step_reducer(params), loss_scale=loss_scale)
            else:
                step_cell = SegmentedStep(chain, cells["AccumulateGrads"](buffers, accum, self.dp.step_reducer(params),
                                                                          loss_scale=loss_scale),
                                          loss_scale=loss_scale)
            apply_cell = cells["ApplyAccumulated"](buffers, optimizer, args.max_grad_norm,
                                                   self.dp.step_reducer(params), skip_non_finite=run.scaler is not None)
        run.chain, run.step_cell, run.apply_cell = chain, step_cell, apply_cell
        run.set_train_modes()
        eval_net = run.loss_net if chain is None else SegmentedLoss(chain)  # validation: the step's own forward
        run.validator = self.make_validator(args, run.val_group, eval_net, run.vae, run.noise_schedule,
                                            run.set_train_modes, run.loss_net.input_names)

    def prepare_outputs(self, run):
        """The output folder, the LoRA metadata, the logger, the loop's generator and progress bar."""
        import numpy as np
        from tqdm import tqdm

        from library import lora_metadata, train_logging, train_state

        args = run.args
        make_output_folder(args.output_dir, "--output_dir")
        dataset_md = lora_metadata.run_metadata(args, run.train_group, run.val_group, run.num_batches,
                                                run.num_train_epochs, self.dp.world_size)
        run.metadata = lora_metadata.build_training_metadata(
            args, session_id=run.session_id, training_started_at=run.training_started_at,
            text_encoder_lr=lora_metadata.text_encoder_lr_value(args.text_encoder_lr),
            optimizer_name=run.optimizer_name, optimizer_args=run.optimizer_args, model_version=run.model_version,
            network_kwargs=self.net_kwargs, dataset_metadata=dataset_md)
        run.ext = "." + (args.save_model_as or "safetensors")
        logger.info("running training: %d images (%d reg), %d batches/epoch, %d epochs, %d steps, accumulation %d",
                    dataset_md["ss_num_train_images"], dataset_md["ss_num_reg_images"], run.num_batches,
                    run.num_train_epochs, args.max_train_steps, run.accum)
        logger.info("lr groups: %s", ", ".join(f"{d or 'all'}={lr}" for d, lr in zip(run.lr_descriptions,
                                                                                       run.base_lrs)))
        run.tracker = train_logging.TrainLogger(args, self.log_with)
        run.rng = np.random.default_rng(args.seed)
        run.min_t = 0 if args.min_timestep is None else args.min_timestep
        run.max_t = 1000 if args.max_timestep is None else args.max_timestep
        run.progress = tqdm(range(args.max_train_steps), smoothing=0, desc="steps", dynamic_ncols=True,
                            disable=not self.dp.is_main)
        run.state_params = run.params + train_state.optimizer_state_parameters(run.optimizer, run.params)
        run.rng_streams = {"noise": run.rng, "vae": getattr(run.vae_encode, "rng", None)}

    def restore_position(self, run):
        """--resume (the state's weights, counters and losses) and --initial_step/--initial_epoch: where the
        loop starts."""
        from library import train_state

        args, num_batches = run.args, run.num_batches
        if args.resume is not None:
            run.resumed = resumed = self.resume_state
            if resumed["num_batches"] != num_batches or resumed["seed"] != args.seed:
                raise UserError(f"--resume {args.resume}: the state was saved with {resumed['num_batches']} batches "
                                f"per epoch and seed {resumed['seed']}; this run has {num_batches} and {args.seed} "
                                "(resume with the same dataset, batch size and --seed)")
            train_state.load_parameters(args.resume, run.state_params)
            run.at_eval_weights = True  # states are saved at a schedule-free optimizer's eval weights, as kohya's
            run.global_step = int(resumed["current_step"])
            run.lr_offset = int(resumed.get("lr_offset", 0))  # a run started with --skip_until_initial_step
            run.start_epoch, run.start_position = int(resumed["current_epoch"]), int(resumed["position"])
            run.losses.extend(float(x) for x in resumed["losses"])
            run.loss_recorder_window.extend(run.losses)
            run.loss_rows.extend(tuple(r) for r in resumed["loss_rows"])
            run.val_rows.extend(tuple(r) for r in resumed.get("val_rows", []))
            if run.scaler is not None and resumed.get("loss_scaler"):
                run.scaler.load_state(resumed["loss_scaler"])
            run.progress.update(run.global_step)
            run.loader.start_at(run.start_epoch, run.start_position)
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", args.resume, run.global_step,
                        run.start_epoch + 1, run.start_position)

        initial = train_util.check_initial_step(args, num_batches, run.accum)
        if initial is not None and initial > 0:
            run.start_epoch = initial // run.num_update_steps_per_epoch
            if args.skip_until_initial_step:  # kohya: the batches before it are skipped, the step count goes on
                run.start_position = (initial % run.num_update_steps_per_epoch) * run.accum
                run.global_step = run.lr_offset = initial
                run.progress.update(run.global_step)
                logger.info("skipping %d steps (epoch %d, batch %d)", initial, run.start_epoch + 1,
                            run.start_position)
            else:  # kohya: only the epochs before the initial step's epoch are left out; steps count from 0
                logger.info("starting at epoch %d (--initial_step %d)", run.start_epoch + 1, initial)
            run.loader.start_at(run.start_epoch, run.start_position)
