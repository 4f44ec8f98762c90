"""--cache_text_encoder_outputs(_to_disk) and --fp16_unet_weights in a real sdxl_train_network.py run
on the tiny SDXL checkpoint saved in fp16 (as SDXL base is): the U-Net-only training with cached text
encoder outputs and the frozen U-Net weights kept in fp16 (computed in fp32) gives the losses and
LoRA of the fp32 run that encodes the captions every step (the cached run reads the U-Net after the
text encoders are freed, the other run every model at once). The disk caches of that run are filled
beforehand by tools/cache_latents.py and tools/cache_text_encoder_outputs.py from the trainer's own
command line: the trainer finds every file valid (none is rewritten) and trains as the run that
encodes everything itself."""
import csv
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))

TRAIN = os.path.join(ROOT, "sdxl_train_network.py")


def _train(ckpt, dataset, out, extra):
    args = ["--pretrained_model_name_or_path", ckpt, "--dataset_config", dataset, "--output_dir", out,
            "--output_name", "te", "--network_module", "networks.lora", "--network_dim", 2,
            "--network_train_unet_only", "--learning_rate", 2e-3, "--max_train_steps", 3, "--seed", 5,
            "--max_data_loader_n_workers", 0, "--cache_latents", "--max_token_length", 150] + extra
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")
    proc = subprocess.run([sys.executable, TRAIN] + [str(a) for a in args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "te_loss.csv")) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    from safetensors.numpy import load_file

    return losses, load_file(os.path.join(out, "te.safetensors")), proc.stderr


def _to_fp16(path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(path, "np") as f:
        metadata = f.metadata()
    tensors = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata)


def test_cached_text_encoder_outputs_and_fp16_unet_weights_train_like_encoding_fp32(tmp_path):
    import make_tiny_train_demo as demo

    ckpt = str(tmp_path / "tiny.safetensors")
    demo.write_checkpoint(ckpt, seed=0, small=True)
    _to_fp16(ckpt)
    images, dataset = demo.write_dataset(str(tmp_path), 3, batch_size=2, seed=4)

    losses, lora, log = _train(ckpt, dataset, tmp_path / "encode", [])
    assert "loading U-Net" in log and "loaded the U-Net" not in log  # every model at once
    import cache_latents
    import cache_text_encoder_outputs

    # the tools, in graph mode as the trainer; the same seed draws the latents the encoding run cached
    tool_argv = [str(a) for a in ("--sdxl", "--pretrained_model_name_or_path", ckpt, "--dataset_config", dataset,
                                  "--seed", 5, "--max_token_length", 150)]
    assert cache_latents.main(tool_argv)["computed"] == 3
    assert cache_text_encoder_outputs.main(tool_argv)["computed"] == 3
    stamps = {n: os.stat(os.path.join(images, n)).st_mtime_ns for n in os.listdir(images) if n.endswith(".npz")}
    assert len(stamps) == 6, sorted(stamps)
    cached_losses, cached_lora, log = _train(ckpt, dataset, tmp_path / "cached",
                                             ["--cache_text_encoder_outputs", "--cache_latents_to_disk",
                                              "--cache_text_encoder_outputs_to_disk", "--fp16_unet_weights"])
    # the text encoders were needed for the cache only: the U-Net was read once they were freed, and the
    # text encoder modules' initial draws were made without them (the LoRA below equals the other run's)
    assert "loading U-Net" not in log and log.index("host memory after loading") > log.index("loaded the U-Net")
    assert {n: os.stat(os.path.join(images, n)).st_mtime_ns for n in os.listdir(images)
            if n.endswith(".npz")} == stamps  # the trainer encoded nothing

    assert len(cached_losses) == 3 and len(set(losses)) > 1
    np.testing.assert_allclose(cached_losses, losses, rtol=1e-5)
    assert set(cached_lora) == set(lora)
    for key, value in lora.items():
        scale = max(1.0, float(np.abs(value).max()))
        np.testing.assert_allclose(cached_lora[key], value, atol=1e-5 * scale, err_msg=key)
    written = sorted(f for f in os.listdir(images) if f.endswith("_te_outputs.npz"))
    assert len(written) == 3, os.listdir(images)
