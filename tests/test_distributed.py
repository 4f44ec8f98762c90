"""Data parallelism (library/distributed.py): launch detection, dataset sharding, the global
random draws, kohya's LR counting, and end to end under ``msrun`` with 2 CPU workers: the
same LoRA as one process with the global batch, one set of output files, and a killed worker
ending the job."""
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from conftest import assert_close  # noqa: E402
from library import custom_train_functions as ctf  # noqa: E402
from library.distributed import DataParallel, launched_world_size, launcher, shard_keys  # noqa: E402

TRAIN = os.path.join(ROOT, "sdxl_train_network.py")


# -- launch detection ----------------------------------------------------------------------------

def test_launch_detection_from_environment():
    assert launcher({}) is None and launched_world_size({}) == 1
    msrun = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "8", "RANK_SIZE": "8", "RANK_ID": "3"}
    assert launcher(msrun) == "msrun" and launched_world_size(msrun) == 8
    assert launcher({"MS_ROLE": "MS_SCHED", "MS_WORKER_NUM": "2"}) == "msrun"
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}) == 4
    assert launched_world_size({"RANK_TABLE_FILE": "/r.json", "RANK_SIZE": "16"}) == 16
    assert launcher({"RANK_SIZE": "2"}) is None  # RANK_SIZE alone is no launch


def test_single_process_is_the_identity():
    from library.distributed import init_distributed

    dp = init_distributed(None)
    assert tuple(dp) == (0, 1) and dp.is_main and not dp.enabled
    batch = {"loss_weights": np.ones(2, np.float32)}
    x = np.arange(8.0).reshape(2, 4)
    assert dp.global_rows(batch, x) is x
    assert dp.local_rows(batch, x)[0] is x
    assert dp.step_reducer([]) is None


# -- sharding -------------------------------------------------------------------------------------

def test_shard_keys_pads_short_global_batches():
    keys = ["a", "b", "c"]  # a short global batch of 3 for 2 ranks x 2
    assert shard_keys(keys, 0, 2, 2) == (["a", "b"], 2, 0)
    assert shard_keys(keys, 1, 2, 2) == (["c", "c"], 1, 2)
    assert shard_keys(["a"], 1, 2, 2) == (["a", "a"], 0, 1)  # nothing real: a copy at weight 0


def _group(images, batch_size, multiplier, seed=3):
    import random

    from dataset_helpers import parse_args

    from library import config_util

    args = parse_args(["--train_data_dir", images, "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64",
                       "--max_bucket_reso", "128", "--bucket_reso_steps", "64", "--train_batch_size",
                       str(batch_size)])
    random.seed(seed)
    group, _ = config_util.build_dataset_groups(args, None, batch_size_multiplier=multiplier)
    return group


def test_sharded_batches_are_the_global_batches(tmp_path):
    """Two ranks with batch 2 load, between them, exactly the images of one process with batch 4,
    bucket by bucket; short batches are padded at weight 0 and the real weights rescaled so the
    mean over ranks is the mean over the real images."""
    import make_tiny_train_demo as demo

    demo.write_images(str(tmp_path / "img" / "1_shape"), 9, [(64, 64), (128, 64)], seed=1)
    single = _group(tmp_path / "img", 4, 1)
    ranks = [DataParallel(r, 2).shard_dataset_group(_group(tmp_path / "img", 2, 2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 3  # buckets of 5 and 4 images: 4 + 1 | 4
    short = 0
    for epoch in (1, 2):
        for g in [single] + ranks:
            g.set_current_epoch(epoch)
        for i in range(len(single)):
            ref = single[i]
            parts = [g[i] for g in ranks]
            n = len(ref["image_keys"])
            keys = [k for p in parts for k, w in zip(p["image_keys"], p["loss_weights"]) if w > 0]
            assert keys == ref["image_keys"]
            for p in parts:
                assert len(p["image_keys"]) == 2 and p["latents"] is None and p["images"].shape[0] == 2
                lo, hi, total = p["dist_rows"]
                assert total == n and p["image_keys"][:hi - lo] == ref["image_keys"][lo:hi]
                np.testing.assert_allclose(p["loss_weights"][:hi - lo], np.full(hi - lo, 4.0 / n), rtol=1e-6)
                assert np.all(p["loss_weights"][hi - lo:] == 0)
                np.testing.assert_array_equal(p["images"][:hi - lo], ref["images"][lo:hi])
            # mean over ranks of mean(w * l) == mean over the real images of l, for any per-image l
            per_image = {k: float(j + 1) for j, k in enumerate(ref["image_keys"])}
            ranks_mean = np.mean([np.mean([w * per_image[k] for k, w in zip(p["image_keys"], p["loss_weights"])])
                                  for p in parts])
            assert abs(ranks_mean - np.mean(list(per_image.values()))) < 1e-6
            short += n < 4
    assert short == 2  # one short global batch per epoch (1 image: rank 1 gets only padding)


def test_global_draws_equal_the_single_process_draws():
    """The trainer's noise block run on global_rows(...) and cut by local_rows(...) on each rank
    gives every rank the rows one process draws for the whole global batch."""
    latents = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)

    def draw(lat, seed=5):
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(lat.shape).astype(np.float32)
        noise = ctf.apply_noise_offset(lat, noise, 0.1, 0.05, rng, True)
        noise = ctf.pyramid_noise_like(noise, rng, 3, 0.3)
        timesteps = rng.integers(0, 1000, size=(lat.shape[0],))
        noisy = ctf.input_perturbation_noise(noise, 0.1, rng, True)
        return noise, noisy, timesteps

    ref = draw(latents)
    parts = [latents[0:2], np.concatenate([latents[2:3], latents[:1]])]  # rank 1: 1 image + 1 padding

    class TwoRanks(DataParallel):
        def _all_gather(self, x):  # what AllGather returns
            assert np.array_equal(x, parts[self.rank])
            return np.concatenate(parts)

    for rank, (lo, hi) in enumerate([(0, 2), (2, 3)]):
        batch = {"dist_rows": (lo, hi, 3), "loss_weights": np.zeros(2, np.float32)}
        dp = TwoRanks(rank, 2)
        g = dp.global_rows(batch, parts[rank])
        out = dp.local_rows(batch, g, *draw(g))
        np.testing.assert_array_equal(out[0][:hi - lo], latents[lo:hi])
        for got, want in zip(out[1:], ref):
            np.testing.assert_array_equal(got[:hi - lo], want[lo:hi])
            assert got.shape[0] == 2


def test_lr_schedule_counts_like_kohya_with_several_processes():
    """accelerate steps kohya's scheduler (built for max_train_steps * W) W times per update:
    an integer warmup of 4 ends after 2 updates with 2 processes; the decay spans the run."""
    from types import SimpleNamespace

    from library.lr_schedules import create_lr_schedule

    args = SimpleNamespace(lr_scheduler="linear", lr_warmup_steps=4, learning_rate=1.0, lr_scheduler_num_cycles=1,
                           lr_scheduler_power=1.0, lr_scheduler_type="", lr_scheduler_args=None, lr_decay_steps=0,
                           lr_scheduler_timescale=None, lr_scheduler_min_lr_ratio=None)
    dp = DataParallel(0, 2)
    schedule = dp.lr_schedule(create_lr_schedule(args, [1.0], 10, num_processes=2))
    got = [schedule.lrs(s)[0] for s in range(10)]
    want = [min(2 * s / 4, (20 - 2 * s) / 16) for s in range(10)]  # diffusers' linear at step 2s of 20
    assert_close(got, want, what="lr")
    single = DataParallel().lr_schedule(create_lr_schedule(args, [1.0], 10))
    assert_close([single.lrs(s)[0] for s in range(10)], [min(s / 4, (10 - s) / 6) for s in range(10)])


# -- end to end under msrun ----------------------------------------------------------------------

def _env(tmp):
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")
    env["TMPDIR"] = str(tmp)  # the other ranks' private output folders go here
    env["MS_NODE_TIMEOUT"] = "10"  # the scheduler gives up on a vanished worker after 10 s
    return env


def _msrun(port, log_dir, args):
    return ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", "--join=True",
            f"--log_dir={log_dir}", "--cluster_time_out=120", TRAIN] + [str(a) for a in args]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import make_tiny_train_demo as demo

    path = str(tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors")
    demo.write_checkpoint(path, seed=0, small=True)
    return path


def _dataset(tmp_path, batch_size):
    import make_tiny_train_demo as demo

    images = tmp_path / "img"
    if not images.exists():
        demo.write_images(str(images), 2, [(64, 64)], seed=1)
    toml = tmp_path / f"dataset{batch_size}.toml"
    toml.write_text(f"[general]\ncaption_extension = '.txt'\n\n[[datasets]]\nresolution = 64\n"
                    f"batch_size = {batch_size}\n\n  [[datasets.subsets]]\n  image_dir = '{images}'\n")
    return toml


def _common(ckpt):
    return ["--pretrained_model_name_or_path", ckpt, "--network_module", "networks.lora", "--network_dim", 4,
            "--network_alpha", 2, "--learning_rate", 1e-3, "--max_train_epochs", 2, "--seed", 7,
            "--max_data_loader_n_workers", 0, "--save_precision", "fp32", "--output_name", "lora",
            "--lr_scheduler", "linear", "--cache_latents"]


def _losses(path):
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f)]


def test_two_workers_batch_1_equal_one_process_batch_2(tmp_path, tiny_ckpt):
    """msrun, 2 CPU workers with batch 1 == 1 process with batch 2 on the same 2 images (2 epochs, 2
    updates with AdamW, cached latents): same losses, same LoRA weights; rank 0 alone writes each LoRA
    file and state once, the loss csv/png and one TensorBoard run; rank 1's private folder is gone.
    Then msrun --resume from the step-1 state ends with the same LoRA."""
    from library.lora_file import load_state_dict_file

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out_dp, out_1 = tmp_path / "out_dp", tmp_path / "out_1"
    logs = tmp_path / "logs"
    t0 = time.time()
    dp = subprocess.Popen(_msrun(_free_port(), tmp_path / "msrun_logs",
                                 _common(tiny_ckpt) + ["--dataset_config", _dataset(tmp_path, 1), "--output_dir",
                                                       out_dp, "--logging_dir", logs, "--save_every_n_steps", 1,
                                                       "--save_state"]),
                          cwd=ROOT, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        dp_out = dp.communicate(timeout=600)[0]
    finally:
        if dp.poll() is None:
            dp.kill()
    t_dp = time.time() - t0
    assert dp.returncode == 0, dp_out[-4000:]
    one = subprocess.run([sys.executable, TRAIN] + [str(a) for a in _common(tiny_ckpt)]
                         + ["--dataset_config", _dataset(tmp_path, 2), "--output_dir", out_1],
                         cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    print(f"msrun 2 workers {t_dp:.0f} s, one process {time.time() - t0 - t_dp:.0f} s")

    assert sorted(os.listdir(out_dp)) == ["lora-state", "lora-step00000001-state", "lora-step00000001.safetensors",
                                          "lora-step00000002-state", "lora-step00000002.safetensors",
                                          "lora.safetensors", "lora_loss.csv", "lora_loss.png"]
    runs = os.listdir(logs)
    assert len(runs) == 1 and os.listdir(logs / runs[0]) == ["network_train"], runs
    assert os.listdir(tmp) == [], os.listdir(tmp)  # rank 1's redirected outputs removed at exit

    rows_dp, rows_1 = _losses(out_dp / "lora_loss.csv"), _losses(out_1 / "lora_loss.csv")
    assert [r[0] for r in rows_dp] == [r[0] for r in rows_1] == [1, 2]
    assert_close([r[1] for r in rows_dp], [r[1] for r in rows_1], what="losses")
    assert [r[2] for r in rows_dp] == [r[2] for r in rows_1]

    sd_dp, md_dp = load_state_dict_file(str(out_dp / "lora.safetensors"))[:2]
    sd_1, md_1 = load_state_dict_file(str(out_1 / "lora.safetensors"))[:2]
    assert sorted(sd_dp) == sorted(sd_1)
    moved = 0
    for k in sd_1:
        a, b = np.asarray(sd_dp[k], np.float64), np.asarray(sd_1[k], np.float64)
        assert_close(a, b, what=k)
        moved += "lora_up" in k and np.abs(b).max() > 1e-4
    assert moved > 10  # the updates are not trivially zero
    # kohya's metadata: --train_batch_size (default 1) x processes x accumulation
    assert (md_dp["ss_total_batch_size"], md_1["ss_total_batch_size"]) == ("2", "1")
    assert md_dp["ss_max_train_steps"] == md_1["ss_max_train_steps"] == "2"

    # resume under msrun: every rank reads rank 0's step-1 state and the job ends where the uninterrupted one did
    out_res = tmp_path / "out_res"
    res = subprocess.run(_msrun(_free_port(), tmp_path / "msrun_logs_res",
                                _common(tiny_ckpt) + ["--dataset_config", _dataset(tmp_path, 1), "--output_dir",
                                                      out_res, "--resume", out_dp / "lora-step00000001-state"]),
                         cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert _losses(out_res / "lora_loss.csv") == rows_dp
    sd_res = load_state_dict_file(str(out_res / "lora.safetensors"))[0]
    for k in sd_dp:
        assert_close(np.asarray(sd_res[k], np.float64), np.asarray(sd_dp[k], np.float64), what=k)


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _worker_pid(msrun_pid, rank):
    for child in _children(msrun_pid):
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"MS_ROLE") == b"MS_WORKER" and env.get(b"RANK_ID") == str(rank).encode():
            return child
    return None


def test_killed_worker_ends_the_job_nonzero(tmp_path, tiny_ckpt):
    """SIGKILL rank 1 once both ranks joined: msrun stops rank 0 and exits non-zero, in bounded time."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log_dir = tmp_path / "msrun_logs"
    proc = subprocess.Popen(_msrun(_free_port(), log_dir, _common(tiny_ckpt)
                                   + ["--dataset_config", _dataset(tmp_path, 1), "--output_dir", tmp_path / "out"]),
                            cwd=ROOT, env=_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        victim = None
        while time.time() < deadline and proc.poll() is None:
            logs = [log_dir / f"worker_{r}.log" for r in range(2)]
            joined = all(p.exists() and "data parallel (msrun): rank" in p.read_text(errors="replace") for p in logs)
            victim = _worker_pid(proc.pid, 1) if joined else None
            if victim:
                break
            time.sleep(0.5)
        assert victim, "rank 1 never joined"
        survivor = _worker_pid(proc.pid, 0)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.time()
        rc = proc.wait(timeout=120)
        elapsed = time.time() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"job ended {elapsed:.1f} s after the kill, exit status {rc}")
    assert rc != 0
    assert elapsed < 60
    assert survivor is None or not os.path.exists(f"/proc/{survivor}") or \
        open(f"/proc/{survivor}/stat").read().split()[2] == "Z"
    assert not (tmp_path / "out" / "lora.safetensors").exists()
