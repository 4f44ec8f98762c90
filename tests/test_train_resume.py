"""--save_state / --resume, TensorBoard logs and the validation loss, end to end on the tiny
checkpoint (real processes, real files): a run killed after a saved state and resumed from it ends
with the same LoRA, the same per-step losses and the same validation losses as an uninterrupted run.

The run trains with AdamWScheduleFree (with its own warmup): the state then holds more than moments
(z, the step count that drives the warmup, the averaging weights, the train/eval mode), and the saved
LoRAs, validation and states must be its averaged weights x (kohya's optimizer eval()), not the
training point y; a resumed run must switch back to y as the uninterrupted one does."""
import csv
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

TRAIN = os.path.join(ROOT, "sdxl_train_network.py")
STEPS = 7
WARMUP = 5  # AdamWScheduleFree's warmup_steps: the resumed run (from step 4) must still be warming up
LR = 2e-3


def _cmd(args):
    return [sys.executable, TRAIN] + [str(a) for a in args]


def _env():
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import make_tiny_train_demo as demo

    root = tmp_path_factory.mktemp("resume")
    ckpt = root / "tiny.safetensors"
    demo.write_checkpoint(str(ckpt), seed=0, small=True)
    images = root / "img"
    demo.write_images(str(images), 4, [(64, 64)], seed=3, captions=True)
    dataset = root / "dataset.toml"
    # 4 images, 1 held out for validation: 3 batches per epoch, so the state at step 4 is in the
    # middle of epoch 2; shuffled captions and caption dropout draw from Python's random, the VAE
    # posterior from its own generator, validation passes from their own seeded streams
    dataset.write_text(f"""[[datasets]]
resolution = 64
batch_size = 1
validation_split = 0.25
  [[datasets.subsets]]
  image_dir = '{images}'
  caption_extension = '.txt'
  shuffle_caption = true
  caption_dropout_rate = 0.3
""")
    return root, ckpt, dataset


def _args(root, ckpt, dataset, out, extra=()):
    return ["--pretrained_model_name_or_path", ckpt, "--dataset_config", dataset, "--output_dir", out,
            "--output_name", "r", "--network_module", "networks.lora", "--network_dim", 2,
            "--learning_rate", LR, "--max_train_steps", STEPS, "--seed", 7, "--max_data_loader_n_workers", 0,
            "--optimizer_type", "AdamWScheduleFree", "--optimizer_args", f"warmup_steps={WARMUP}", "weight_decay=0.01",
            "--noise_offset", 0.05, "--save_every_n_steps", 2, "--save_state",
            "--save_last_n_steps_state", 2, "--validate_every_n_steps", 3] + list(extra)


def _losses(path):
    with open(path) as f:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f)]


def _val_losses(path):
    with open(path) as f:
        return [(int(r["step"]), int(r["epoch"]), float(r["val_loss"])) for r in csv.DictReader(f)]


def _lora(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def _state(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "weights.safetensors"))


def _same_tensors(lora, state, names):
    """The LoRA file's up/down tensors are the state's LoRA parameters (its names are kohya's, the state's
    the model's: compared as sets of arrays)."""
    def key(a):
        return (a.shape, a.astype(np.float32).tobytes())

    file_tensors = sorted(key(v) for k, v in lora.items() if not k.endswith(".alpha"))
    return file_tensors == sorted(key(state[n]) for n in names)


def _check_saved_weights_are_the_averaged_ones(full):
    """schedulefree's x_k = (1 - c_k) x_{k-1} + c_k z_k with c_k = w_k / sum(w_1..w_k), w_k = lr_max_k^2
    (r=0, weight_lr_power 2): the LoRA saved at step 6 and the one at the end (step 7), with z and the
    weight sum of the end state, must satisfy it; the training point y = x + (1 - beta1)(z - x) does not."""
    s6, s7 = _state(full / "r-step00000006-state"), _state(full / "r-state")
    names = [k[2:] for k in s7 if k.startswith("z.")]  # the LoRA parameters (the state's z.<name>)
    assert names and all(n in s7 for n in names)
    assert float(s7["optimizer_train_mode"]) == 0.0  # saved in eval mode, as kohya's states
    assert _same_tensors(_lora(full / "r.safetensors"), s7, names), "the last LoRA is not the state's weights"
    assert _same_tensors(_lora(full / "r-step00000006.safetensors"), s6, names), "step-6 LoRA != its state"
    lr_max = float(s7["optimizer_lr_max"])
    expected_sum = sum((LR * min(k / WARMUP, 1.0)) ** 2 for k in range(1, STEPS + 1))
    assert abs(lr_max - LR) <= 1e-6 * LR
    assert abs(float(s7["optimizer_weight_sum"]) - expected_sum) <= 1e-5 * expected_sum
    c = lr_max ** 2 / float(s7["optimizer_weight_sum"])
    worst, moved = 0.0, 0.0
    for n in names:
        x6, x7, z7 = (a.astype(np.float64) for a in (s6[n], s7[n], s7["z." + n]))
        scale = max(np.abs(x7).max(), 1e-12)
        worst = max(worst, np.abs((1 - c) * x6 + c * z7 - x7).max() / scale)
        moved = max(moved, np.abs(0.1 * (z7 - x7)).max() / scale)  # y - x, beta1 0.9
    print(f"schedule-free averaging: x7 vs (1-c) x6 + c z7 {worst:.2g}, y7 vs x7 {moved:.2g} of the tensor's scale")
    assert worst <= 1e-5, worst
    assert moved > 1e-3, moved  # saving y instead would fail by far


def _read_events(folder):
    """Scalars of the TensorBoard event files under ``folder``: {tag: [(step, value)]}."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.startswith("events.out.tfevents")]
    for path in files:
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return files, scalars


def test_killed_run_resumed_equals_uninterrupted(setup):
    root, ckpt, dataset = setup
    full = root / "full"
    logs = root / "logs"
    proc = subprocess.run(_cmd(_args(root, ckpt, dataset, full, ["--logging_dir", logs, "--log_prefix", "run_"])),
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(full))
    # states: step 2 removed by --save_last_n_steps_state 2, step 4 and 6 kept, the last one at the end
    assert "r-step00000004-state" in files and "r-step00000006-state" in files and "r-state" in files, files
    assert "r-step00000002-state" not in files and not any(f.startswith(".tmp") for f in files), files

    # TensorBoard: one run folder <prefix><time>/network_train with kohya's tags, one value per step
    runs = os.listdir(logs)
    assert len(runs) == 1 and runs[0].startswith("run_"), runs
    event_files, scalars = _read_events(logs / runs[0] / "network_train")
    assert event_files
    full_losses = _losses(full / "r_loss.csv")
    assert [s for s, _ in scalars["loss/current"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in scalars["loss/current"]], [l for _, l, _ in full_losses], rtol=1e-6)
    lr_tags = [t for t in scalars if t.startswith("lr/")]
    assert sorted(lr_tags) == ["lr/textencoder", "lr/unet"], lr_tags
    assert "loss/average" in scalars and len(scalars["loss/epoch_average"]) == 3
    # validation: after steps 3 and 6 and at the end of each epoch (steps 3, 6, 7)
    full_val = _val_losses(full / "r_val_loss.csv")
    assert [(s, e) for s, e, _ in full_val] == [(3, 1), (3, 1), (6, 2), (6, 2), (7, 3)], full_val
    assert full_val[0][2] == full_val[1][2] and full_val[2][2] != full_val[0][2]  # same weights, same value
    assert [s for s, _ in scalars["loss/validation/step_average"]] == [3, 6]
    assert [s for s, _ in scalars["loss/validation/epoch_average"]] == [1, 2, 3]
    assert {lr for _, _, lr in full_losses} == {LR}  # kohya: schedule-free optimizers keep the given lr
    _check_saved_weights_are_the_averaged_ones(full)

    # the same run, killed once its step-4 state exists, then resumed from that state
    killed = root / "killed"
    victim = subprocess.Popen(_cmd(_args(root, ckpt, dataset, killed)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=ROOT, env=_env(), start_new_session=True)
    state = killed / "r-step00000004-state"
    deadline = time.time() + 600
    while not state.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert state.exists(), "the step-4 state was never written"
    assert not (killed / "r.safetensors").exists(), "the run finished before it was killed: test proves nothing"

    resumed = subprocess.run(_cmd(_args(root, ckpt, dataset, killed, ["--resume", state])), capture_output=True,
                             text=True, cwd=ROOT, env=_env(), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr, resumed.stderr[-2000:]
    got = _losses(killed / "r_loss.csv")
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([l for _, l, _ in got], [l for _, l, _ in full_losses], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([lr for _, _, lr in got], [lr for _, _, lr in full_losses], rtol=1e-6)
    got_val = _val_losses(killed / "r_val_loss.csv")
    assert [r[:2] for r in got_val] == [r[:2] for r in full_val]
    np.testing.assert_allclose([r[2] for r in got_val], [r[2] for r in full_val], rtol=1e-5)
    a, b = _lora(full / "r.safetensors"), _lora(killed / "r.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        scale = max(1e-6, np.abs(a[k]).max())
        assert np.abs(a[k] - b[k]).max() <= 1e-4 * scale, k
    # and the run did learn something after the resume point (the weights are not the step-4 ones)
    s4 = _lora(full / "r-step00000004.safetensors")
    assert max(np.abs(a[k] - s4[k]).max() for k in a if k.endswith("lora_up.weight")) > 0


def test_resume_errors(setup, tmp_path):
    root, ckpt, dataset = setup
    for folder, msg in ((tmp_path / "missing", "state folder not found"),
                        (tmp_path, "not a training state folder")):
        proc = subprocess.run(_cmd(_args(root, ckpt, dataset, tmp_path / "o", ["--resume", folder])),
                              capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and msg in lines[0], proc.stderr[-2000:]
    proc = subprocess.run(_cmd(_args(root, ckpt, dataset, tmp_path / "o", ["--log_with", "wandb"])),
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert proc.returncode == 2 and "wandb is not available" in proc.stderr
