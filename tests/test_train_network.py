"""sdxl_train_network.py end to end on the tiny SDXL-topology checkpoint, in subprocesses with
real files (checkpoint, PNGs, dataset .toml, --config_file), and its argument checks."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

TRAIN = os.path.join(ROOT, "sdxl_train_network.py")


def _run(args, timeout=900):
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")
    return subprocess.run([sys.executable, TRAIN] + [str(a) for a in args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _error_lines(proc):
    return [l for l in proc.stderr.strip().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import make_tiny_train_demo as demo

    path = str(tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors")
    demo.write_checkpoint(path, seed=0, small=True)  # 2 UNet levels: quicker to compile
    return path


# -- argument checks (fast: they stop before any model work) --------------------------------------

def test_unknown_argument_stops_with_one_line():
    proc = _run(["--no_such_argument", "1"])
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and "unrecognized arguments: --no_such_argument" in lines[0], proc.stderr


def test_mistyped_argument_is_not_a_prefix_and_gets_a_suggestion(tmp_path):
    """argparse would take --learning_rat as --learning_rate; here names match exactly, with a suggestion."""
    proc = _run(["--learning_rat", "1e-4", "--output_dir", tmp_path])
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and "unrecognized arguments: --learning_rat" in lines[0], proc.stderr
    assert "did you mean --learning_rate?" in lines[0], proc.stderr
    config = tmp_path / "c.toml"
    config.write_text("[training]\nlearning_rat = 1e-4\n")
    proc = _run(["--config_file", config])
    assert proc.returncode == 2 and "did you mean learning_rate?" in _error_lines(proc)[0], proc.stderr


def test_help_shows_defaults():
    """Every script's --help shows the defaults; the inference options a first run needs have help texts."""
    import re

    import sdxl_minimal_inference as smi
    from library.train_args import setup_parser
    from networks import sdxl_merge_lora
    from tools import convert_weights

    text = " ".join(setup_parser().format_help().split())
    assert "--learning_rate LEARNING_RATE learning rate (default: 2e-06)" in text
    assert "--max_train_steps MAX_TRAIN_STEPS training steps (default: 1600)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    from library.sdxl_schedulers import KOHYA_SAMPLERS, SCHEDULERS

    assert len(KOHYA_SAMPLERS) == 16 and set(KOHYA_SAMPLERS) == set(SCHEDULERS)  # every kohya name is available
    assert (f"--sample_sampler SAMPLE_SAMPLER sampler for sample images, any of kohya's 16: "
            f"{', '.join(KOHYA_SAMPLERS)} (default: ddim)") in text
    text = " ".join(smi.setup_parser().format_help().split())
    for option in ("--prompt PROMPT", "--negative_prompt NEGATIVE_PROMPT", "--output_dir OUTPUT_DIR"):
        assert re.search(re.escape(option) + r" [a-z]", text), option  # a help text follows the option
    assert "(default: 50)" in text and "(default: A photo of a cat)" in text
    assert "(default: float)" in " ".join(sdxl_merge_lora.setup_parser().format_help().split())
    assert "--output OUTPUT" in convert_weights.setup_parser().format_help()
    with pytest.raises(SystemExit) as e:
        smi.setup_parser().parse_args(["--ckpt_path", "x", "--step", "3"])  # no prefix matching
    assert e.value.code == 2


def test_loss_curve_ticks(tmp_path):
    """The loss PNG's axes: round step ticks, several loss ticks."""
    from library.train_outputs import nice_ticks, write_loss_curve_png

    assert nice_ticks(1, 40, 8) == [10, 20, 30, 40]
    assert nice_ticks(1, 1600, 8) == [250, 500, 750, 1000, 1250, 1500]
    assert nice_ticks(0.25, 1.07, 6) == [0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(1, 1) == [1]
    path = tmp_path / "loss.png"
    write_loss_curve_png(str(path), [1.0 / (i + 1) for i in range(40)])
    write_loss_curve_png(str(tmp_path / "one.png"), [0.5])
    assert path.stat().st_size > 0 and (tmp_path / "one.png").exists()


@pytest.mark.parametrize("sub", ["", "sub"])
def test_bad_output_dir_stops_before_loading(tmp_path, sub):
    """A regular file as --output_dir (or a folder under one): one line before the checkpoint is opened (the
    checkpoint here is not even a checkpoint), no traceback."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    proc = _run(["--pretrained_model_name_or_path", junk, "--output_dir", afile / sub if sub else afile,
                 "--network_module", "networks.lora", "--train_data_dir", tmp_path])
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc)
    assert len(lines) == 1 and "--output_dir" in lines[0] and "afile" in lines[0] and "is a file" in lines[0], \
        proc.stderr


@pytest.mark.parametrize("extra,name", [(["--deepspeed"], "--deepspeed"),
                                        (["--fp8_base"], "--fp8_base"),
                                        (["--v2"], "--v2")])
def test_not_implemented_argument_stops_with_one_line(tmp_path, extra, name):
    proc = _run(["--pretrained_model_name_or_path", tmp_path / "missing.safetensors", "--output_dir", tmp_path,
                 "--network_module", "networks.lora", "--train_data_dir", tmp_path] + extra)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc)
    assert len(lines) == 1 and name in lines[0] and "not implemented" in lines[0], proc.stderr


@pytest.mark.parametrize("extra", [["--ddp_timeout", "0"], ["--huggingface_repo_id", "0"]])
def test_not_implemented_argument_given_as_zero_stops(extra):
    """0 is a value (``0 == False`` made these pass unnoticed); checked in-process, before anything loads."""
    from library.device_utils import UserError
    from library.train_args import check_not_implemented, parse_args, setup_parser

    parser = setup_parser()
    args = parse_args(parser, ["--network_module", "networks.lora"] + extra)
    with pytest.raises(UserError, match=extra[0]):
        check_not_implemented(args, parser)
    check_not_implemented(parse_args(parser, ["--network_module", "networks.lora"]), parser)  # defaults pass


def test_text_encoder_lr_one_value_or_one_per_text_encoder(tmp_path):
    """kohya's ``--text_encoder_lr`` takes several values (``nargs="*"``) and a config file may hold a number
    or a list (kohya's ``--output_config`` writes a list): each becomes [lr] or [lr1, lr2]."""
    from library.device_utils import UserError
    from library.train_args import parse_args, setup_parser, text_encoder_lrs

    parser = setup_parser()
    assert text_encoder_lrs(parse_args(parser, ["--text_encoder_lr", "1e-5", "2e-5"]).text_encoder_lr) == [1e-5, 2e-5]
    assert text_encoder_lrs(parse_args(parser, []).text_encoder_lr) is None
    for value, expected in (("[1e-5]", [1e-5]), ("1e-5", [1e-5]), ("[1e-5, 3e-5]", [1e-5, 3e-5])):
        cfg = tmp_path / "train.toml"
        cfg.write_text(f"[training_arguments]\ntext_encoder_lr = {value}\n")
        assert text_encoder_lrs(parse_args(parser, ["--config_file", str(cfg)]).text_encoder_lr) == expected
    with pytest.raises(UserError, match="--text_encoder_lr"):
        text_encoder_lrs([1e-5, 2e-5, 3e-5])


def _verify(tmp_path, extra):
    """The trainer's start checks, in-process: nothing loads (the checkpoint path does not exist)."""
    import sdxl_train_network
    from library.train_args import parse_args, setup_parser

    parser = setup_parser()
    args = parse_args(parser, ["--pretrained_model_name_or_path", str(tmp_path / "missing.safetensors"),
                               "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora",
                               "--train_data_dir", str(tmp_path)] + [str(a) for a in extra])
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    trainer.verify_args(args, parser)
    return args, trainer


@pytest.mark.parametrize("extra,match", [
    (["--network_args", "foo=1"], "unknown network_args for networks.lora: foo"),
    (["--network_args", "dropout=0.1"], "network_args dropout is LyCORIS's key"),
    # the plugin point: a module that does not import, or has no create_network
    (["--network_module", "networks.no_such"], "--network_module networks.no_such: cannot import it"),
    (["--network_module", "library.layers"], "library.layers is not a network module: it has no create_network"),
    (["--network_args", "conv_dim=x"], "conv_dim must be an integer"),
    (["--network_args", "rank_dropout=1.5"], r"rank_dropout must be in \[0, 1\)"),
    (["--dim_from_weights", "--network_weights", "w.safetensors", "--network_args", "rank_dropout=0.1"],
     "rank_dropout cannot be combined with --dim_from_weights"),
    (["--dim_from_weights", "--network_weights", "w.safetensors", "--network_args", "loraplus_lr_ratio=4",
      "down_lr_weight=sine"], "loraplus_lr_ratio cannot be combined with --dim_from_weights"),
    (["--dim_from_weights", "--network_weights", "w.safetensors", "--network_args", "foo=1"],
     "unknown network_args for networks.lora: foo"),
    (["--dim_from_weights", "--network_weights", "w.safetensors", "--network_alpha", "4"],
     "--network_alpha cannot be combined with --dim_from_weights"),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.LambdaLR", "--lr_warmup_steps", "5"],
     "torch LR schedulers need a torch optimizer"),
    # kohya's sdxl_train_util.verify_sdxl_training_args: "clip_skip will be unexpected" (warned, then unused)
    (["--clip_skip", "2"], "--clip_skip 2: SDXL training does not use clip_skip"),
    (["--clip_skip", "0"], "--clip_skip 0: SDXL training does not use clip_skip"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "leave nothing to train"),
    # --base_weights: the files are read at start (whether they fit the model: test_base_weights_...)
    (["--base_weights", "no_such_base.safetensors"], "--base_weights no_such_base.safetensors: file not found"),
    (["--base_weights_multiplier", "0.5"], "--base_weights_multiplier needs --base_weights"),
    (["--base_weights", "a.safetensors", "--base_weights_multiplier", "1", "2"],
     "--base_weights_multiplier has 2 values for 1 --base_weights file"),
    (["--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine"],
     "--lr_scheduler cosine cannot be used: --optimizer_type AdamWScheduleFree keeps a constant learning rate"),
])
def test_network_and_scheduler_args_refused_at_start(tmp_path, extra, match):
    """network_args are checked when the run starts (they were checked after the checkpoint load and the latent
    caching); with --dim_from_weights, what kohya's create_network_from_weights drops (everything but the
    block-LR keys, and --network_alpha) is refused; a torch scheduler class gets its own reason, not the warmup's."""
    from library.device_utils import UserError

    with pytest.raises(UserError, match=match):
        _verify(tmp_path, extra)


def test_dim_from_weights_keeps_the_block_lr_keys(tmp_path):
    """kohya's create_network_from_weights reads down/mid/up_lr_weight and block_lr_zero_threshold: accepted."""
    args, trainer = _verify(tmp_path, ["--dim_from_weights", "--network_weights", "w.safetensors", "--network_args",
                                       "down_lr_weight=sine", "mid_lr_weight=0.5", "block_lr_zero_threshold=0.1"])
    assert trainer.net_kwargs == {"down_lr_weight": "sine", "mid_lr_weight": "0.5", "block_lr_zero_threshold": "0.1"}


@pytest.mark.parametrize("module,extra,match", [
    ("networks.lora", ["--network_args", "foo=1"], "unknown network_args for networks.lora: foo"),
    ("networks.lorra", [], "--network_module networks.lorra: cannot import it"),
])
def test_unknown_network_arg_stops_before_the_checkpoint(tmp_path, module, extra, match):
    """The whole script: one line, exit 2, and the (junk) checkpoint is never opened."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    proc = _run(["--pretrained_model_name_or_path", junk, "--output_dir", tmp_path / "out", "--network_module",
                 module, "--train_data_dir", tmp_path] + extra)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc)
    assert len(lines) == 1 and match in lines[0], proc.stderr


def test_debug_dataset_prints_and_stops(tmp_path):
    """kohya's --debug_dataset: the batches are printed and the run returns before any model work (here: the
    checkpoint is junk and never opened, the output folder is never made, exit 0); --cache_info on a dataset
    without DreamBooth subsets has nothing to cache: one line."""
    import make_tiny_train_demo as demo

    demo.write_images(str(tmp_path / "img" / "2_sks"), 2, [(64, 64)], seed=2, captions=False)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    proc = _run(["--pretrained_model_name_or_path", junk, "--output_dir", out, "--network_module", "networks.lora",
                 "--train_data_dir", tmp_path / "img", "--resolution", "64", "--debug_dataset"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Total dataset length (steps): 4" in proc.stdout and "epoch: 1" in proc.stdout, proc.stdout
    assert proc.stdout.count('caption: "sks"') == 4, proc.stdout
    assert not out.exists()
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "x"}}))
    demo.write_images(str(tmp_path / "ft"), 1, [(64, 64)], seed=3, captions=False)
    meta.write_text(json.dumps({os.path.splitext(f)[0]: {"caption": "x"} for f in os.listdir(tmp_path / "ft")}))
    proc = _run(["--pretrained_model_name_or_path", junk, "--output_dir", out, "--network_module", "networks.lora",
                 "--train_data_dir", tmp_path / "ft", "--in_json", meta, "--resolution", "64", "--cache_info"])
    assert proc.returncode == 2 and "--cache_info" in _error_lines(proc)[-1], proc.stderr[-3000:]


def test_console_log_arguments(tmp_path, capsys):
    """kohya's --console_log_level/--console_log_file/--console_log_simple (utils.setup_logging): the level, a file
    (overwritten, message-only lines), plain messages on stdout; a file that cannot be opened: one line."""
    import logging

    from library.device_utils import UserError
    from library.train_args import parse_args, setup_parser
    from library.train_logging import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    log = tmp_path / "run.log"
    log.write_text("old run\n")
    try:
        setup_logging(parse_args(setup_parser(), ["--console_log_file", str(log), "--console_log_level", "WARNING"]))
        logging.getLogger("x").info("hidden")
        logging.getLogger("x").warning("shown")
        root.handlers[0].flush()
        assert log.read_text() == "shown\n"
        setup_logging(parse_args(setup_parser(), ["--console_log_simple"]))
        logging.getLogger("x").info("plain")
        assert capsys.readouterr().out == "plain\n"
        with pytest.raises(UserError, match="--console_log_file .*no_dir"):
            setup_logging(parse_args(setup_parser(), ["--console_log_file", str(tmp_path / "no_dir" / "x.log")]))
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_output_config_writes_the_changed_arguments_and_stops(tmp_path):
    """kohya's --output_config: the arguments that differ from the defaults go into the --config_file path
    (config_file/output_config/wandb_api_key left out), the run stops (exit 0, no training); an existing file
    is not overwritten; the written file reads back as the same arguments; without --config_file: one line."""
    import toml

    from library.train_args import parse_args, setup_parser

    cfg = tmp_path / "written.toml"
    argv = ["--output_config", "--config_file", str(cfg), "--pretrained_model_name_or_path", "base.safetensors",
            "--network_module", "networks.lora", "--network_dim", "8", "--text_encoder_lr", "1e-5", "2e-5",
            "--network_args", "conv_dim=4", "--max_train_steps", "1600", "--output_dir", str(tmp_path / "out")]
    proc = _run(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert toml.load(cfg) == {"pretrained_model_name_or_path": "base.safetensors", "network_module": "networks.lora",
                              "network_dim": 8, "text_encoder_lr": [1e-5, 2e-5], "network_args": ["conv_dim=4"],
                              "output_dir": str(tmp_path / "out")}  # max_train_steps 1600 is the default
    assert not (tmp_path / "out").exists()
    again = _run(argv)
    assert again.returncode == 2 and "already exists" in _error_lines(again)[-1], again.stderr
    parser = setup_parser()
    back = vars(parse_args(parser, ["--config_file", str(cfg)]))
    given = vars(parse_args(parser, argv[3:]))
    assert {k: v for k, v in back.items() if k not in ("config_file", "_argv")} == \
        {k: v for k, v in given.items() if k not in ("config_file", "_argv")}
    alone = _run(["--output_config"])
    assert alone.returncode == 2 and "--config_file" in _error_lines(alone)[-1], alone.stderr


def test_initial_step_and_epoch_as_kohya_computes_them(tmp_path):
    """kohya's train_network: initial step = --initial_step, else (--initial_epoch - 1) * ceil(batches /
    accumulation); it must be below max_train_steps (kohya asserts); checks that need no data run at start."""
    import argparse

    from library import train_util
    from library.device_utils import UserError

    def ns(**kw):
        base = dict(initial_step=None, initial_epoch=None, skip_until_initial_step=False, resume=None,
                    max_train_steps=100, max_train_epochs=None)
        base.update(kw)
        return argparse.Namespace(**base)

    assert train_util.initial_update_step(ns(), 10, 1) is None
    assert train_util.initial_update_step(ns(initial_epoch=3), 10, 3) == 2 * 4  # ceil(10 / 3) = 4 per epoch
    assert train_util.initial_update_step(ns(initial_epoch=3, initial_step=5), 10, 3) == 5  # step wins
    assert train_util.check_initial_step(ns(initial_epoch=1), 10, 1) == 0
    with pytest.raises(UserError, match="max_train_steps should be greater than initial step: 20 vs 20"):
        train_util.check_initial_step(ns(initial_epoch=3, max_train_epochs=2), 10, 1)
    for kw, match in ((dict(initial_step=-1), "--initial_step must be >= 0"),
                      (dict(initial_epoch=0), "--initial_epoch must be >= 1"),
                      (dict(skip_until_initial_step=True), "--skip_until_initial_step needs"),
                      (dict(initial_step=3, resume="state"), "cannot be combined with --resume")):
        with pytest.raises(UserError, match=match):
            train_util.check_initial_step_args(ns(**kw))
    with pytest.raises(UserError, match="--skip_until_initial_step needs"):
        _verify(tmp_path, ["--skip_until_initial_step"])  # the trainer runs the check at start


def test_config_file_unknown_key_stops(tmp_path):
    cfg = tmp_path / "train.toml"
    cfg.write_text("[training_arguments]\nmax_train_steps = 3\nno_such_key = 1\n")
    proc = _run(["--config_file", cfg])
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and "no_such_key" in lines[0], proc.stderr


# -- end to end -------------------------------------------------------------------------------------

def ms_tensor(array):
    from mindspore import Tensor

    return Tensor(array)


def _lora_file(path):
    from library.lora_file import load_state_dict_file

    sd, metadata = load_state_dict_file(path)[:2]
    return sd, metadata


MAX_NORM = 1e-4


def test_dreambooth_class_tokens_buckets_accumulation(tmp_path, tiny_ckpt):
    """DreamBooth class+identifier, two aspect-ratio buckets, text encoders trained too, kohya's attention
    flags (--xformers before --sdpa: the chunked attention on the CPU),
    gradient accumulation 2 with gradient checkpointing (the segmented step), epochs and epoch saves
    with kohya's names, max-norm regularisation (--scale_weight_norms) after every update, kohya's
    dataset metadata; --weighted_captions with a weighted class token (the weights go into the compiled,
    segmented step with the text encoders)."""
    import make_tiny_train_demo as demo

    images = tmp_path / "img"
    demo.write_images(str(images), 4, [(128, 64), (64, 128)], seed=1, captions=False)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"""[general]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 32

[[datasets]]
resolution = 96
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{images}'
  class_tokens = 'shq (shape:1.3)'
  num_repeats = 1
""")
    out = tmp_path / "out"
    proc = _run(["--pretrained_model_name_or_path", tiny_ckpt, "--dataset_config", dataset, "--output_dir", out,
                 "--output_name", "db", "--network_module", "networks.lora", "--network_dim", 4,
                 "--network_alpha", 2, "--learning_rate", 1e-3, "--text_encoder_lr", 5e-4, 4e-4,
                 "--gradient_accumulation_steps", 2, "--max_train_epochs", 2, "--save_every_n_epochs", 1,
                 "--seed", 1, "--max_data_loader_n_workers", 0, "--lr_scheduler", "cosine",
                 "--lr_warmup_steps", 1, "--save_precision", "fp32", "--scale_weight_norms", MAX_NORM,
                 "--gradient_checkpointing", "--xformers", "--sdpa", "--weighted_captions"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "U-Net attention: chunked" in proc.stderr, proc.stderr[-3000:]  # kohya: xformers before sdpa
    assert "weighted caption: 'shq (shape:1.3)' -> 'shq ': 1, 'shape': 1.3" in proc.stderr, proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert "db.safetensors" in files and "db-000001.safetensors" in files, files
    assert "db_loss.png" in files and "db_loss.csv" in files
    sd, md = _lora_file(str(out / "db.safetensors"))
    prefixes = {k.split("_", 2)[1] for k in sd if k.startswith("lora_")}
    assert {"unet", "te1", "te2"} <= prefixes, prefixes
    zero_ups = [k for k, v in sd.items() if k.endswith("lora_up.weight") and np.abs(np.asarray(v)).max() == 0]
    # only text encoder 1's last layer (3 layers here) does not reach the loss (kohya uses hidden_states[-2])
    assert zero_ups and all(k.startswith("lora_te1_text_model_encoder_layers_2_") for k in zero_ups), zero_ups
    assert all(np.asarray(v).dtype == np.float32 for v in sd.values())
    # kohya's max-norm: every module's |up @ down * alpha/dim| <= MAX_NORM, and it did bind
    norms = []
    for key in (k for k in sd if k.endswith(".lora_up.weight")):
        name = key[: -len(".lora_up.weight")]
        up, down = np.asarray(sd[key], np.float64), np.asarray(sd[name + ".lora_down.weight"], np.float64)
        scale = float(np.asarray(sd[name + ".alpha"])) / down.shape[0]
        norms.append(np.linalg.norm(up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * scale)
    assert max(norms) <= MAX_NORM * (1 + 1e-4), max(norms)
    assert sum(n > MAX_NORM * 0.999 for n in norms) > 0, max(norms)
    # 2 buckets x 1 batch each = 2 batches per epoch; accumulation 2 -> 1 update per epoch
    assert md["ss_steps"] == "2" and md["ss_epoch"] == "2" and md["ss_num_epochs"] == "2", md
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_text_encoder_lr"] == "[0.0005, 0.0004]" and md["ss_gradient_checkpointing"] == "True"
    (ds,) = json.loads(md["ss_datasets"])
    assert ds["is_dreambooth"] and ds["batch_size_per_device"] == 2 and ds["resolution"] == [96, 96]
    assert ds["enable_bucket"] and ds["min_bucket_reso"] == 64 and ds["max_bucket_reso"] == 128
    (sub,) = ds["subsets"]
    assert sub["image_dir"] == "img" and sub["class_tokens"] == "shq (shape:1.3)" and sub["is_reg"] is False
    assert sub["img_count"] == 4 and sub["num_repeats"] == 1
    assert json.loads(md["ss_dataset_dirs"]) == {"img": {"n_repeats": 1, "img_count": 4}}
    assert json.loads(md["ss_tag_frequency"]) == {"img": {"shq (shape:1.3)": 4}} == ds["tag_frequency"]
    assert sum(b["count"] for b in ds["bucket_info"]["buckets"].values()) == 4
    with open(out / "db_loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    # cosine with 1 warmup step over 2 steps: lr(0) = 0, lr(1) = base
    assert float(rows[0]["lr"]) == 0.0


def test_demo_trains_with_falling_loss(tmp_path):
    """The README's first command (tools/make_tiny_train_demo.py, then --config_file) on the 2-level
    test topology (same pipeline and settings, half the compile time): the loss falls."""
    import make_tiny_train_demo as demo

    train = demo.make_demo(str(tmp_path / "demo"), small=True)
    old_umask = os.umask(0o022)  # outputs: 0666 minus the umask, whatever mode their temporary file had
    try:
        proc = _run(["--config_file", train])
    finally:
        os.umask(old_umask)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo" / "lora"
    files = sorted(os.listdir(out))
    assert "tiny_lora.safetensors" in files and "tiny_lora_loss.png" in files, files
    assert any(f.startswith("tiny_lora-step") for f in files), files
    samples = sorted(os.listdir(out / "sample"))  # before training (kohya: epoch 0) and after the last step
    assert sorted(s.split("_")[2] for s in samples) == ["000040", "e000000"], samples
    written = [out / f for f in files if os.path.isfile(out / f)] + [out / "sample" / f for f in samples]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o644)}, written
    # the samples' progress bars (leave=False: tqdm may skip printing a fast last step, so no "100%")
    assert "denoising: " in proc.stderr and "sample images" in proc.stderr

    # the saved LoRA loads in sdxl_minimal_inference.py and changes its image (PyNative: no compile)
    import sdxl_minimal_inference as smi

    pixels = []
    for i, lora in enumerate(([], ["--lora_weights", str(out / "tiny_lora.safetensors")])):
        folder = tmp_path / f"gen{i}"
        smi.main(["--ckpt_path", str(tmp_path / "demo" / "tiny_sdxl.safetensors"), "--prompt", "a red circle",
                  "--width", "64", "--height", "64", "--steps", "4", "--seed", "3", "--output_dir", str(folder),
                  "--save_latents", "--pynative"] + lora)
        (npz,) = [f for f in os.listdir(folder) if f.endswith(".npz")]
        pixels.append(np.load(folder / npz)["pixels"])
    assert np.abs(pixels[0] - pixels[1]).max() > 0.01
    with open(out / "tiny_lora_loss.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    n = max(1, len(losses) // 10)
    first, last = np.mean(losses[:n]), np.mean(losses[-n:])
    assert last < 0.8 * first, (first, last, losses)
    summary = json.loads(proc.stdout.strip().splitlines()[-1].split("; ", 1)[1])
    assert summary["steps"] == len(losses)
    _, md = _lora_file(str(out / "tiny_lora.safetensors"))
    assert md["ss_text_encoder_lr"] == "None"  # not given: kohya writes None, not the resolved lr


def test_dim_from_weights_starts_from_the_file(tmp_path, tiny_ckpt):
    """--dim_from_weights: module dims/alphas and the starting weights come from --network_weights
    (a LoRA of dim 2 with random up weights); with a negligible learning rate the saved LoRA equals it.
    The run trains with CAME (kohya's pytorch_optimizer.CAME): the one-graph step compiles with it."""
    import library  # noqa: F401
    from library import layers
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint
    from networks import lora

    te1, te2, vae, unet, _, _ = load_models_from_sdxl_checkpoint(tiny_ckpt)
    layers.set_init_seed(3)
    net = lora.create_network(1.0, 2, 1, vae, [te1, te2], unet)
    net.apply_to([te1, te2], unet, False, True)
    rng = np.random.default_rng(0)
    for module in net.unet_loras:
        w = module.lora_up.weight
        w.set_data(ms_tensor(rng.standard_normal(w.shape).astype(np.float32) * 0.01))
    src = str(tmp_path / "start.safetensors")
    net.save_weights(src, None, {})
    start, _ = _lora_file(src)

    refused = _run(["--pretrained_model_name_or_path", tiny_ckpt, "--output_dir", tmp_path / "x",
                    "--network_module", "networks.lora", "--dim_from_weights", "--network_weights", src,
                    "--network_dim", 8, "--train_data_dir", tmp_path])
    assert refused.returncode == 2 and "--network_dim cannot be combined with --dim_from_weights" in refused.stderr

    images = tmp_path / "img"
    import make_tiny_train_demo as demo
    demo.write_images(str(images), 2, [(64, 64)], seed=2, captions=False)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 1\n[[datasets.subsets]]\n"
                       f"image_dir = '{images}'\nclass_tokens = 'shq'\n")
    out = tmp_path / "out"
    proc = _run(["--pretrained_model_name_or_path", tiny_ckpt, "--dataset_config", dataset, "--output_dir", out,
                 "--output_name", "fw", "--network_module", "networks.lora", "--dim_from_weights",
                 "--network_weights", src, "--network_train_unet_only", "--learning_rate", 1e-12,
                 "--optimizer_type", "CAME", "--max_train_steps", 2, "--max_data_loader_n_workers", 0, "--save_precision", "fp32",
                 "--network_args", "down_lr_weight=1,1,1,1,1,1,1,1,1", "--metadata_title", "From file",
                 "--metadata_trigger_phrase", "shq", "--console_log_file", tmp_path / "train.log",
                 "--initial_step", 1, "--skip_until_initial_step"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()  # kohya's --console_log_file: the log goes there, not to stderr
    assert "saving checkpoint" in log and "saving checkpoint" not in proc.stderr, log
    # --initial_step 1 --skip_until_initial_step: the first batch is skipped, one step trained, counted as step 2
    assert "skipping 1 steps (epoch 1, batch 1)" in log, log
    with open(out / "fw_loss.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2"]
    trained, md = _lora_file(str(out / "fw.safetensors"))
    assert md["ss_steps"] == "2"
    assert md["modelspec.title"] == "From file" and md["modelspec.trigger_phrase"] == "shq"
    assert md["ss_optimizer"] == "pytorch_optimizer.optimizer.came.CAME", md["ss_optimizer"]
    assert json.loads(md["ss_network_args"]) == {"down_lr_weight": "1,1,1,1,1,1,1,1,1"}
    assert set(trained) == set(start)
    for key, value in start.items():
        np.testing.assert_allclose(np.asarray(trained[key]), np.asarray(value), atol=1e-6, err_msg=key)
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in trained.items() if k.endswith("lora_up.weight"))


def test_base_weights_are_merged_as_the_inference_merge_does(tmp_path, tiny_ckpt):
    """--base_weights A B --base_weights_multiplier 0.5 (kohya: B gets 1): the trainer's merge, right after the
    checkpoint load, leaves every U-Net and text encoder weight as sdxl_minimal_inference's --lora_weights
    merge of A:0.5 and B:1 does, and a merged linear weight is W + 0.5 scale_A up_A@down_A + scale_B up_B@down_B
    (numpy, from the files). A file that does not fit stops the run before any file is merged."""
    import library  # noqa: F401
    import sdxl_minimal_inference as smi
    import train_network
    from library import layers
    from library.device_utils import UserError
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint
    from networks import lora
    from safetensors.numpy import save_file

    def models():
        te1, te2, vae, unet, _, _ = load_models_from_sdxl_checkpoint(tiny_ckpt)
        return [te1, te2], vae, unet

    def weights(tes, unet):
        return {f"{i}/{p.name}": p.asnumpy().copy() for i, m in enumerate(tes + [unet]) for p in m.get_parameters()}

    tes, vae, unet = models()
    original = weights(tes, unet)
    rng = np.random.default_rng(4)
    files, nets = [], []
    for seed, dim, alpha in ((1, 2, 1), (2, 4, 2)):  # A: U-Net and text encoders; B: U-Net only, another rank
        layers.set_init_seed(seed)
        net = lora.create_network(1.0, dim, alpha, vae, tes, unet)
        if seed == 2:
            net.text_encoder_loras = []
        for module in net.loras:
            w = module.lora_up.weight
            w.set_data(ms_tensor(rng.standard_normal(w.shape).astype(np.float32) * 0.01))
        files.append(str(tmp_path / f"base{seed}.safetensors"))
        net.save_weights(files[-1], None, {})
        nets.append(net)
    made_with = weights(tes, unet)  # the LoRA files were made without touching the model (not applied)
    assert all(np.array_equal(made_with[k], original[k]) for k in original)

    tes_t, vae_t, unet_t = models()
    train_network.merge_base_weights(files, [0.5], tes_t, vae_t, unet_t)
    tes_i, vae_i, unet_i = models()
    smi.merge_loras([(files[0], 0.5), (files[1], 1.0)], tes_i[0], tes_i[1], vae_i, unet_i)
    trained, inferred = weights(tes_t, unet_t), weights(tes_i, unet_i)
    changed = [k for k in original if not np.array_equal(trained[k], original[k])]
    assert any(k.startswith("2/") for k in changed) and any(k.startswith("0/") for k in changed), changed[:5]
    for k in original:
        np.testing.assert_array_equal(trained[k], inferred[k], err_msg=k)
    # one U-Net linear layer by the formula
    module_a = next(m for m in nets[0].unet_loras if not m.is_conv)
    module_b = next(m for m in nets[1].unet_loras if m.lora_name == module_a.lora_name)
    sd_a, sd_b = (lora_file_sd(f) for f in files)
    expected = original[f"2/{module_a.org_module.weight.name}"].astype(np.float64)
    for sd, m, mult in ((sd_a, module_a, 0.5), (sd_b, module_b, 1.0)):
        up = sd[f"{m.lora_name}.lora_up.weight"].astype(np.float64)
        down = sd[f"{m.lora_name}.lora_down.weight"].astype(np.float64)
        expected += mult * float(sd[f"{m.lora_name}.alpha"]) / down.shape[0] * (up @ down)
    got = trained[f"2/{module_a.org_module.weight.name}"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())

    bad = str(tmp_path / "bad.safetensors")
    save_file({"lora_unet_no_such_layer.lora_down.weight": np.zeros((2, 8), np.float32),
               "lora_unet_no_such_layer.lora_up.weight": np.zeros((8, 2), np.float32)}, bad)
    tes_b, vae_b, unet_b = models()
    with pytest.raises(UserError) as e:
        train_network.merge_base_weights([files[0], bad], None, tes_b, vae_b, unet_b)
    assert str(e.value).startswith(f"--base_weights {bad}: LoRA module lora_unet_no_such_layer does not exist")
    after = weights(tes_b, unet_b)
    assert all(np.array_equal(after[k], original[k]) for k in original)  # A was not merged either


def lora_file_sd(path):
    from safetensors.numpy import load_file

    return load_file(path)


def test_loha_trains_two_steps(tmp_path, tiny_ckpt):
    """--network_module networks.loha through the whole trainer (tiny checkpoint, 2 steps): the saved file has
    LyCORIS's LoHa keys with the conv modules of conv_dim, the metadata names the module, and the factor that
    starts at zero (hada_w2_a) has moved."""
    import make_tiny_train_demo as demo
    from library.lora_file import load_state_dict_file

    images = tmp_path / "img"
    demo.write_images(str(images / "2_shq"), 2, [(64, 64)], seed=2, captions=False)
    out = tmp_path / "out"
    proc = _run(["--pretrained_model_name_or_path", tiny_ckpt, "--train_data_dir", images, "--resolution", 64,
                 "--output_dir", out, "--output_name", "lh", "--network_module", "networks.loha", "--network_dim", 2,
                 "--network_alpha", 1, "--network_args", "conv_dim=2", "conv_alpha=1", "--network_train_unet_only",
                 "--learning_rate", 1e-2, "--max_train_steps", 2, "--max_data_loader_n_workers", 0,
                 "--save_precision", "fp32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sd, md, _ = load_state_dict_file(str(out / "lh.safetensors"))
    assert md["ss_network_module"] == "networks.loha" and md["ss_network_dim"] == "2"
    leaves = {k.split(".", 1)[1] for k in sd}
    assert leaves == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, leaves
    assert all(k.startswith("lora_unet_") for k in sd)
    assert any(np.asarray(v).ndim == 2 and np.asarray(v).shape[1] % 9 == 0 and "in_layers" in k
               for k, v in sd.items() if k.endswith("hada_w1_b"))  # a 3x3 conv: (dim, in*3*3)
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in sd.items() if k.endswith("hada_w2_a"))
