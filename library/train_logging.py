"""TensorBoard logs of a training run (kohya's ``--logging_dir`` / ``--log_with`` / ``--log_prefix``).

Same folders and tags as kohya with accelerate's TensorBoard tracker:
``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name or network_train>/events.out.tfevents.*``
with ``loss/current``, ``loss/average``, ``lr/<group>`` (and ``max_norm/*`` with
``--scale_weight_norms``) per update step and ``loss/epoch_average`` per epoch.
Written with tensorboardX (no TensorFlow, no torch).
"""
from __future__ import annotations

import json
import os
import time

from library.device_utils import UserError

DEFAULT_TRACKER_NAME = "network_train"

CONSOLE_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"


def add_logging_arguments(parser):
    """kohya's ``utils.add_logging_arguments``: the console log's level, a file instead of stderr, a plain form."""
    parser.add_argument("--console_log_level", type=str, default=None, choices=CONSOLE_LOG_LEVELS,
                        help="logging level (default INFO)")
    parser.add_argument("--console_log_file", type=str, default=None,
                        help="write the log to this file (overwritten) instead of stderr")
    parser.add_argument("--console_log_simple", action="store_true",
                        help="plain log lines (the message only) on stdout, as kohya without its rich handler")


def setup_logging(args=None, reset=True):
    """kohya's ``utils.setup_logging``: the root logger at ``--console_log_level`` (INFO by default), into
    ``--console_log_file`` (opened for writing, message-only lines as kohya writes them), or on stdout with the
    message only for ``--console_log_simple``, or else on stderr with level and logger name (kohya's rich
    handler shows those too; rich is not a dependency here). A file that cannot be opened stops the run."""
    import logging
    import sys

    root = logging.getLogger()
    if root.handlers and not reset:
        return
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    level = getattr(args, "console_log_level", None) or "INFO"
    path = getattr(args, "console_log_file", None)
    if path:
        try:
            handler = logging.FileHandler(path, mode="w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"--console_log_file {path}: cannot open it for writing ({e.strerror or e})") from None
        fmt = "%(message)s"
    elif getattr(args, "console_log_simple", False):
        handler, fmt = logging.StreamHandler(sys.stdout), "%(message)s"
    else:
        handler, fmt = logging.StreamHandler(sys.stderr), CONSOLE_FORMAT
    handler.setFormatter(logging.Formatter(fmt=fmt, datefmt="%Y-%m-%d %H:%M:%S"))
    root.setLevel(getattr(logging, level))
    root.addHandler(handler)


def check_logging_args(args):
    """kohya's checks, at start: which tracker, and a logging folder when TensorBoard logs."""
    log_with = args.log_with
    if log_with is None and args.logging_dir is not None:
        log_with = "tensorboard"
    if log_with in ("wandb", "all"):
        raise UserError(f"--log_with {log_with}: wandb is not available in this port (use --log_with tensorboard)")
    if log_with == "tensorboard" and args.logging_dir is None:
        raise UserError("--log_with tensorboard needs --logging_dir")
    if log_with is None and (args.log_prefix is not None or args.log_config or args.log_tracker_name is not None):
        raise UserError("--log_prefix/--log_config/--log_tracker_name need --logging_dir")
    return log_with


def run_log_dir(args, now=None) -> str:
    prefix = "" if args.log_prefix is None else args.log_prefix
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(now))
    return os.path.join(args.logging_dir, prefix + stamp, args.log_tracker_name or DEFAULT_TRACKER_NAME)


def lr_tag(i, n_groups, lr_descriptions, network_train_unet_only):
    """kohya's ``generate_step_logs`` name of group ``i``'s learning rate."""
    if lr_descriptions is not None and lr_descriptions[i]:
        return f"lr/{lr_descriptions[i]}"
    idx = i - (0 if network_train_unet_only else -1)
    if idx == -1:
        return "lr/textencoder"
    return f"lr/group{idx}" if n_groups > 2 else "lr/unet"


def step_logs(args, current_loss, avr_loss, lrs, lr_descriptions, keys_scaled=None, mean_norm=None,
              maximum_norm=None) -> dict:
    logs = {"loss/current": current_loss, "loss/average": avr_loss}
    if keys_scaled is not None:
        logs["max_norm/keys_scaled"] = keys_scaled
        logs["max_norm/average_key_norm"] = mean_norm
        logs["max_norm/max_key_norm"] = maximum_norm
    for i, lr in enumerate(lrs):
        logs[lr_tag(i, len(lrs), lr_descriptions, args.network_train_unet_only)] = lr
    return logs


class TrainLogger:
    """A TensorBoard writer, or nothing when logging is off (``log`` is then a no-op)."""

    def __init__(self, args, log_with):
        self.writer = None
        self.log_dir = None
        if log_with != "tensorboard":
            return
        from tensorboardX import SummaryWriter

        self.log_dir = run_log_dir(args)
        try:
            os.makedirs(self.log_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"--logging_dir {args.logging_dir}: cannot create {self.log_dir}: {e.strerror}") from None
        self.writer = SummaryWriter(logdir=self.log_dir, flush_secs=30)
        if args.log_config:
            config = {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")
                      and "token" not in k and "api_key" not in k}
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, values: dict, step: int):
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), int(step))

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
