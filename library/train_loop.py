"""The loop of a training run (``library.train_run``'s ``TrainRun``): ``LoopStages``, the stages that
``NetworkTrainer.train`` calls after the set-up: run_epochs (each batch: run_batch, and at each update
run_update and after_update; each epoch's end: end_epoch), then finish; saving the LoRA and the state."""
from __future__ import annotations

import json
import logging
import math
import os
import time

from library.device_utils import UserError, peak_rss_gb, reset_peak_rss, rss_gb
from library.train_outputs import (get_epoch_ckpt_name, get_last_ckpt_name, get_step_ckpt_name, stale_number,
                                   write_loss_curve_png)
from library.train_step import SegmentedStep

# the trainer's messages keep the logger name users see on the console ("INFO train_network: ...")
logger = logging.getLogger("train_network")


class LoopStages:
    """The loop, saving and the end of a run (see the module docstring); mixed into the trainer, whose
    ``step_inputs`` hook they call."""

    def run_epochs(self, run):
        """The sampler and --sample_at_first, then the epochs until --max_train_steps."""
        from library import train_state
        from library.train_sampling import TrainingSampler

        args = run.args
        run.sampler = TrainingSampler(args, run.text_encoders, run.vae, run.unet, self.dp.rank,
                                      self.dp.world_size)  # sizes checked
        run.use_eval_weights(run.sampling(0, run.global_step))
        run.sampler.sample(0, run.global_step)  # --sample_at_first (kohya passes epoch 0)
        run.epoch = run.start_epoch
        run.optimizer.set_lrs(run.schedule.lrs(run.lr_position()))
        run.micro_losses = []
        logger.info("host memory before the first step: %.2f GB", rss_gb() or 0.0)
        run.steps_measured = reset_peak_rss()  # the steps' peak memory, without the loading before them
        run.t_update = time.perf_counter()
        for epoch in range(run.start_epoch, run.num_train_epochs):
            run.epoch = epoch
            if run.global_step >= args.max_train_steps:
                break
            run.network.on_epoch_start(run.text_encoders, run.unet)
            run.loader.current_epoch.value = epoch + 1
            run.train_group.set_current_epoch(epoch + 1)
            run.n_in_epoch = run.start_position if epoch == run.start_epoch else 0  # resumed or skipped batches
            if run.resumed is not None:  # the state's generators, after the epoch's bucket shuffle (kohya's seed+epoch)
                train_state.restore_rng(run.resumed["rng"], run.rng_streams)
                run.resumed = None
            for batch in run.loader:
                if self.run_batch(run, batch):
                    break
            self.end_epoch(run)
        run.progress.close()
        run.loader.close()

    def batch_latents(self, run, batch):
        """The batch's latents (cached, or encoded now) scaled by the VAE factor, float32."""
        import numpy as np

        args = run.args
        latents = batch["latents"]
        if latents is None:
            latents = np.concatenate([run.vae_encode(batch["images"][i:i + args.vae_batch_size])
                                      for i in range(0, len(batch["images"]), args.vae_batch_size)])
        return (latents * self.vae_scale_factor).astype(np.float32)

    def run_batch(self, run, batch):
        """One micro-batch through the compiled step, and the update when the accumulation is complete.
        -> True when --max_train_steps is reached."""
        import numpy as np

        from library import custom_train_functions as ctf

        args = run.args
        run.loader.current_step.value = run.global_step
        run.n_in_epoch += 1
        latents = self.dp.global_rows(batch, self.batch_latents(run, batch))  # data parallel: the global batch
        b = latents.shape[0]
        noise, noisy_noise, timesteps = ctf.draw_noise(args, latents, run.rng,
                                                       lambda r: r.integers(run.min_t, run.max_t, size=(b,)))
        latents, noise, noisy_noise, timesteps = self.dp.local_rows(batch, latents, noise, noisy_noise, timesteps)
        weights = (np.asarray(batch["loss_weights"], np.float32)
                   * ctf.post_process_loss_weights(args, timesteps, run.noise_schedule)).astype(np.float32)
        inputs = self.step_inputs(args, batch, latents, noise, noisy_noise, timesteps, weights,
                                  run.noise_schedule).flat(run.loss_net.input_names)
        key = tuple(latents.shape)
        if self.dynamic_shapes and not run.compile_times:
            from mindspore import Tensor as _T
            run.step_cell.set_inputs(*[_T(shape=[None] * x.ndim, dtype=x.dtype) for x in inputs])
            key = "dynamic"
        elif self.dynamic_shapes:
            key = "dynamic"
        run.use_train_weights()
        t0 = time.perf_counter()
        loss = float(run.step_cell(*inputs).asnumpy())
        dt = time.perf_counter() - t0
        if key not in run.compile_times:
            run.compile_times[key] = dt
            logger.info("compiled the step for latents %s in %.1f s", key, dt)
        run.micro_losses.append(loss)
        run.micro += 1
        last_in_epoch = run.n_in_epoch == run.num_batches
        if run.apply_cell is None or run.micro % run.accum == 0 or last_in_epoch:
            self.run_update(run, key, dt)
            if run.global_step >= args.max_train_steps:
                return True
        return False

    def run_update(self, run, key, dt):
        """An optimizer update: the accumulated gradients applied (fp16: skipped on overflow), the step's loss
        and time recorded, the outputs due at this step written, the next step's learning rates set."""
        scaler = run.scaler
        if run.apply_cell is not None:
            finite = bool(run.apply_cell().asnumpy())
            if scaler is not None:
                scaler.update(found_inf=not finite)
                if not finite:
                    logger.info("step %d: inf/NaN gradients at loss scale %g: update skipped, scale %g",
                                run.global_step + 1, scaler.scale / scaler.backoff_factor, scaler.scale)
        run.micro = 0
        step_loss = sum(run.micro_losses) / len(run.micro_losses)
        run.micro_losses = []
        now = time.perf_counter()
        step_seconds = now - run.t_update
        run.t_update = now
        if key in run.compile_times and run.compile_times[key] != dt:
            run.step_times.append(step_seconds)
        self.after_update(run, step_loss, step_seconds)
        run.optimizer.set_lrs(run.schedule.lrs(run.lr_position()))

    def after_update(self, run, loss_value, step_seconds):
        """The step counted and logged, max-norm regularisation, then what --sample_every_n_steps,
        --validate_every_n_steps and --save_every_n_steps ask for at this step."""
        from library import train_logging, train_validation

        args = run.args
        run.global_step += 1
        global_step = run.global_step
        run.progress.update(1)
        run.losses.append(loss_value)
        run.loss_recorder_window.append(loss_value)
        window = run.loss_recorder_window[-run.num_update_steps_per_epoch:]
        avr = sum(window) / len(window)
        run.loss_rows.append((global_step, loss_value, avr, run.schedule.lrs(run.lr_position() - 1)[0]))
        postfix = dict(avr_loss=f"{avr:.4f}", loss=f"{loss_value:.4f}", s_step=f"{step_seconds:.2f}")
        keys_scaled = mean_norm = max_norm = None
        if args.scale_weight_norms:
            keys_scaled, mean_norm, max_norm = run.network.apply_max_norm_regularization(args.scale_weight_norms)
            postfix.update(keys_scaled=keys_scaled, avg_norm=f"{mean_norm:.4f}")
        run.progress.set_postfix(**postfix)
        if not math.isfinite(loss_value):
            raise UserError(f"loss is {loss_value} at step {global_step}: stopping (no LoRA saved for it)")
        run.tracker.log(train_logging.step_logs(args, loss_value, avr, run.schedule.lrs(run.lr_position() - 1),
                                                run.lr_descriptions, keys_scaled, mean_norm, max_norm), global_step)
        validate = train_validation.should_validate_step(args, global_step, run.validator.has_data)
        save = args.save_every_n_steps is not None and global_step % args.save_every_n_steps == 0
        run.use_eval_weights(run.sampling(None, global_step) or validate or save)
        run.sampler.sample(None, global_step)  # --sample_every_n_steps
        if validate:
            val_loss = run.validator.run("validation steps")
            run.val_rows.append((global_step, run.epoch + 1, val_loss))
            run.tracker.log({"loss/validation/step_average": val_loss,
                             "loss/validation/step_divergence": val_loss - avr}, global_step)
        if save:
            self.save_at(run, True, global_step)

    def end_epoch(self, run):
        """The epoch's average loss; what --validate_every_n_epochs, --save_every_n_epochs and
        --sample_every_n_epochs ask for at its end."""
        from library import train_validation

        args, epoch = run.args, run.epoch
        epoch_avr = None
        if run.n_in_epoch:
            window = run.losses[-run.num_update_steps_per_epoch:]
            epoch_avr = sum(window) / len(window)
            run.tracker.log({"loss/epoch_average": epoch_avr}, epoch + 1)
        validate = bool(run.n_in_epoch) and train_validation.should_validate_epoch(args, epoch + 1,
                                                                                   run.validator.has_data)
        save = args.save_every_n_epochs is not None and (epoch + 1) % args.save_every_n_epochs == 0 \
            and (epoch + 1) < run.num_train_epochs
        run.use_eval_weights(validate or save or run.sampling(epoch + 1, run.global_step))
        if validate:
            val_loss = run.validator.run("epoch validation steps")
            run.val_rows.append((run.global_step, epoch + 1, val_loss))
            logger.info("epoch %d: validation loss %.6f", epoch + 1, val_loss)
            run.tracker.log({"loss/validation/epoch_average": val_loss,
                             "loss/validation/epoch_divergence": val_loss - epoch_avr}, epoch + 1)
        if save:
            self.save_at(run, False, epoch + 1)
        run.sampler.sample(epoch + 1, run.global_step)  # --sample_every_n_epochs

    # -- saving ------------------------------------------------------------------------------
    def save_at(self, run, by_steps, number):
        """--save_every_n_steps / --save_every_n_epochs: the LoRA (and with --save_state the state) of this
        step or epoch ``number``, then "keep the last N": the files that fall out of --save_last_n_steps /
        --save_last_n_epochs (and their _state forms, which default to them) removed."""
        from library import train_state

        args = run.args
        if by_steps:
            every, last_n = args.save_every_n_steps, args.save_last_n_steps
            last_n_state = args.save_last_n_steps_state
            model_name, state_name = get_step_ckpt_name, train_state.STEP_STATE_NAME
        else:
            every, last_n = args.save_every_n_epochs, args.save_last_n_epochs
            last_n_state = args.save_last_n_epochs_state
            model_name, state_name = get_epoch_ckpt_name, train_state.EPOCH_STATE_NAME
        self.save_model(run, model_name(args, run.ext, number), run.global_step, run.epoch + 1)
        stale = stale_number(number, every, last_n, by_steps)
        if stale is not None:
            self.remove_model(run, model_name(args, run.ext, stale))
        if args.save_state:
            self.save_train_state(run, state_name.format(args.output_name, number))
            stale = stale_number(number, every, last_n_state or last_n, by_steps)
            if stale is not None:
                train_state.remove_state(os.path.join(args.output_dir, state_name.format(args.output_name, stale)))

    def save_model(self, run, ckpt_name, steps, epoch_no):
        """The LoRA file with the run's metadata (the step, epoch and time of this save added); refused when
        a weight is not finite."""
        import numpy as np

        from library import lora_metadata

        args = run.args
        path = os.path.join(args.output_dir, ckpt_name)
        md = dict(run.metadata)
        md["ss_training_finished_at"] = str(time.time())
        md["ss_steps"] = str(steps)
        md["ss_epoch"] = str(epoch_no)
        md.update(lora_metadata.get_sai_model_spec(args, sdxl=self.is_sdxl, lora=True))
        md_to_save = lora_metadata.minimum_metadata(md) if args.no_metadata else md
        for p in run.params:
            if not np.all(np.isfinite(p.asnumpy())):
                raise UserError(f"LoRA weights contain NaN/inf at step {steps}: not saving {path}")
        logger.info("saving checkpoint: %s", path)
        run.network.save_weights(path, args.save_precision, md_to_save)

    def remove_model(self, run, name):
        path = os.path.join(run.args.output_dir, name)
        if os.path.exists(path):
            logger.info("removing old checkpoint: %s", path)
            os.remove(path)

    def save_train_state(self, run, name):
        """--save_state: the LoRA and optimizer parameters with the counters, losses and generators."""
        from library import train_state

        args = run.args
        state = {"current_step": run.global_step, "current_epoch": run.epoch + (run.n_in_epoch >= run.num_batches),
                 "position": run.n_in_epoch % run.num_batches, "rng": train_state.capture_rng(run.rng_streams),
                 "losses": run.losses, "loss_rows": run.loss_rows, "val_rows": run.val_rows,
                 "loss_scaler": None if run.scaler is None else run.scaler.state(),
                 "max_train_steps": args.max_train_steps, "num_batches": run.num_batches, "seed": args.seed,
                 "lr_offset": run.lr_offset}
        logger.info("saving state: %s", name)
        train_state.save_state(os.path.join(args.output_dir, name), run.state_params, state)

    def finish(self, run):
        """The last LoRA (and state), the loss CSVs and curve, the run's summary (returned)."""
        from library import train_state

        args = run.args
        run.use_eval_weights()  # kohya: the LoRA and the state at the end hold the eval weights too
        self.save_model(run, get_last_ckpt_name(args, run.ext), run.global_step, run.num_train_epochs)
        if args.save_state or args.save_state_on_train_end:
            self.save_train_state(run, train_state.LAST_STATE_NAME.format(args.output_name))
        run.tracker.close()
        write_loss_csvs(args, run.loss_rows, run.val_rows)
        write_loss_curve_png(os.path.join(args.output_dir, f"{args.output_name}_loss.png"), run.losses)
        summary = {"steps": run.global_step, "epochs": run.num_train_epochs,
                   "compile_s": {(k if isinstance(k, str) else "x".join(map(str, k))): round(v, 2)
                                 for k, v in run.compile_times.items()},
                   "s_per_step": round(sum(run.step_times) / len(run.step_times), 4) if run.step_times else None,
                   "first_loss": run.losses[0] if run.losses else None,
                   "last_loss": run.losses[-1] if run.losses else None,
                   "steps_peak_rss_gb": round(peak_rss_gb(), 2) if run.steps_measured else None}
        if run.chain is not None:
            summary["num_graphs"] = run.chain.num_graphs
        if isinstance(run.step_cell, SegmentedStep) and run.step_cell.time_breakdown():
            summary["segmented_step_s"] = {k: round(v, 3) for k, v in run.step_cell.time_breakdown().items()}
        logger.info("training finished: %s", json.dumps(summary))
        print(f"model saved: {os.path.join(args.output_dir, get_last_ckpt_name(args, run.ext))} "
              f"(loss curve {args.output_name}_loss.png); {json.dumps(summary)}")
        return summary


def write_loss_csvs(args, loss_rows, val_rows):
    """``<output_name>_loss.csv`` (step, loss, avr_loss, lr) and, when validated, ``<output_name>_val_loss.csv``."""
    from library.path_utils import atomic_write_text

    lines = ["step,loss,avr_loss,lr"] + [f"{r[0]},{r[1]:.8g},{r[2]:.8g},{r[3]:.8g}" for r in loss_rows]
    atomic_write_text(os.path.join(args.output_dir, f"{args.output_name}_loss.csv"), "\n".join(lines) + "\n")
    if val_rows:
        lines = ["step,epoch,val_loss"] + [f"{r[0]},{r[1]},{r[2]:.8g}" for r in val_rows]
        atomic_write_text(os.path.join(args.output_dir, f"{args.output_name}_val_loss.csv"), "\n".join(lines) + "\n")
