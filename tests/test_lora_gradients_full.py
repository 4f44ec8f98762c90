"""Full-size SDXL: every U-Net LoRA gradient of the segmented step (what ``--gradient_checkpointing`` runs)
against torch (opt-in: --runslow / RUN_SLOW=1; ~7 GB disk, ~11 GB RAM per process, minutes).

A rank-8 LoRA on kohya's U-Net targets (722 modules) with random non-zero up weights is written as a
kohya file; one process computes our gradients (graph mode, frozen weights stored in fp16 as
``--fp16_unet_weights``, fp32 compute: the file's weights are fp16, so both sides compute with the
same values), another torch's (diffusers' U-Net from the same file, the LoRA added by forward hooks,
torch's gradient checkpointing), each saving its gradients; every tensor must agree within 1e-4 of
its own largest gradient. ``SDXL_FULL_FILE`` names an existing full-size file to use.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow
RANK, LATENT = 8, 32  # 256x256 images


def _inputs():
    from library.sdxl_original_unet import get_size_embeddings

    rng = np.random.default_rng(0)
    time_ids = np.array([[256, 256, 0, 0, 256, 256]], np.float32)
    pooled = rng.standard_normal((1, 1280), dtype=np.float32)
    size = get_size_embeddings(time_ids[:, 0:2], time_ids[:, 2:4], time_ids[:, 4:6], dim=256)
    return dict(x=rng.standard_normal((1, 4, LATENT, LATENT), dtype=np.float32), t=np.array([500.0], np.float32),
                context=rng.standard_normal((1, 77, 2048), dtype=np.float32), pooled=pooled, time_ids=time_ids,
                y=np.concatenate([pooled, size], -1).astype(np.float32),
                target=rng.standard_normal((1, 4, LATENT, LATENT), dtype=np.float32))


def _our_unet_with_lora(ckpt, alpha):
    """Graph mode; our U-Net from the file (frozen weights stored in fp16, fp32 compute, as
    ``--fp16_unet_weights``) with a rank-``RANK`` LoRA on kohya's U-Net targets: (unet, network)."""
    import mindspore as ms

    from library import layers
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint
    from networks import lora as lora_module

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    te1, te2, vae, unet, _, _ = load_models_from_sdxl_checkpoint(ckpt)
    del te1, te2, vae
    unet.to_dtype(ms.float16, compute_dtype=ms.float32)
    layers.set_init_seed(5)
    network = lora_module.create_network(1.0, RANK, alpha, None, [], unet)  # kohya's init: lora_up zero
    network.apply_to([], unet, False, True)
    for p in unet.get_parameters():
        p.requires_grad = False
    return unet, network


def _by_lora_name(network, params, arrays):
    """{"<kohya module>.lora_down"/".lora_up": array} for ``arrays`` in the order of ``params``."""
    names = {p.name: lora for lora in network.loras for p in (lora.lora_down.weight, lora.lora_up.weight)}
    return {f"{names[p.name].lora_name}.{p.name.split('.')[-2]}": a for p, a in zip(params, arrays)}


def worker_ours(ckpt, lora_file, out):
    """Write the LoRA file (random up weights) and our gradients of the l2 loss."""
    from mindspore import Tensor, ops

    from library.segments import Segment, SegmentChain
    from library.unet_segments import unet_segments
    from test_lora_gradients import _MSE

    unet, network = _our_unet_with_lora(ckpt, RANK)
    rng = np.random.default_rng(7)
    for lora in network.loras:
        w = lora.lora_up.weight
        w.set_data(Tensor((0.01 * rng.standard_normal(w.shape)).astype(np.float32)))
    network.save_weights(lora_file, "float", {})
    network.requires_grad_(True)
    unet.set_train(True)
    params = network.get_trainable_params()
    segs = unet_segments(unet) + [Segment("loss", _MSE(), ("pred", "target", "weights"), ("loss",))]
    chain = SegmentChain(segs, ("x", "timesteps", "context", "y", "target", "weights"), params)
    chain.set_train(True)
    d = _inputs()
    values = chain.forward(dict(zip(chain.data, [Tensor(d[k]) for k in ("x", "t", "context", "y", "target")]
                                    + [Tensor(np.ones(1, np.float32))])))
    loss = float(values["loss"].asnumpy())
    grads = chain.backward(values, {"loss": ops.ones_like(values["loss"])})
    np.savez(out, loss=loss, **_by_lora_name(network, params, [g.asnumpy() for g in grads]))


def _torch_unet_with_lora(ckpt, lora_file):
    """diffusers' U-Net from the SAI file (fp32, frozen, torch's gradient checkpointing) with the LoRA file
    added by forward hooks (kohya's formula): (unet, {kohya module name: (down, up)})."""
    import torch
    from safetensors.numpy import load_file

    import sdxl_checkpoint_helpers as H

    torch.set_num_threads(os.cpu_count())
    du, sgm_to_diffusers = H.diffusers_unet_from_sai(ckpt)
    du.requires_grad_(False)
    du.train()
    du.enable_gradient_checkpointing()
    module_of = {"lora_unet_" + sgm[:-len(".weight")].replace(".", "_"): d[:-len(".weight")]
                 for sgm, d in sgm_to_diffusers.items() if sgm.endswith(".weight")}
    sd = load_file(lora_file)
    tensors = {}
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[:-len(".lora_down.weight")]
        down = torch.tensor(sd[key], requires_grad=True)
        up = torch.tensor(sd[name + ".lora_up.weight"], requires_grad=True)
        tensors[name] = (down, up)
        H.add_lora_hook(du.get_submodule(module_of[name]), down, up, float(sd[name + ".alpha"]) / down.shape[0])
    return du, tensors


def worker_torch(ckpt, lora_file, out):
    """torch's gradients of the same loss with the same LoRA (kohya's formula, by forward hooks)."""
    import torch

    du, tensors = _torch_unet_with_lora(ckpt, lora_file)
    d = _inputs()
    pred = du(torch.tensor(d["x"]), torch.tensor(d["t"]), torch.tensor(d["context"]),
              added_cond_kwargs={"text_embeds": torch.tensor(d["pooled"]), "time_ids": torch.tensor(d["time_ids"])}).sample
    loss = ((pred - torch.tensor(d["target"])) ** 2).mean()
    loss.backward()
    out_arrays = {"loss": float(loss.detach())}
    for name, (down, up) in tensors.items():
        out_arrays[name + ".lora_down"] = down.grad.numpy()
        out_arrays[name + ".lora_up"] = up.grad.numpy()
    np.savez(out, **out_arrays)


STEPS, LR, MAX_GRAD_NORM = 3, 1e-3, 1.0


def _step_inputs(i):
    """Step i's batch as kohya's train_network builds it: scaled latents, noise, an integer timestep and
    its DDPM coefficients, cached text-encoder outputs, the size conditioning."""
    from library.custom_train_functions import NoiseSchedule

    rng = np.random.default_rng(100 + i)
    t = rng.integers(0, 1000, (1,))
    sqrt_ab, sqrt_1mab = NoiseSchedule().coefficients(t)
    return dict(latents=(0.13025 * 7 * rng.standard_normal((1, 4, LATENT, LATENT))).astype(np.float32),
                noise=rng.standard_normal((1, 4, LATENT, LATENT), dtype=np.float32), t=t.astype(np.float32),
                sqrt_ab=sqrt_ab, sqrt_1mab=sqrt_1mab,
                context=rng.standard_normal((1, 77, 2048), dtype=np.float32),
                pooled=rng.standard_normal((1, 1280), dtype=np.float32),
                time_ids=np.array([[256, 256, 0, 0, 256, 256]], np.float32))


def worker_ours_steps(ckpt, lora_file, out):
    """Three training steps as ``sdxl_train_network.py --gradient_checkpointing --fp16_unet_weights
    --cache_text_encoder_outputs --network_train_unet_only --optimizer_type AdamW --learning_rate 1e-3
    --max_grad_norm 1.0`` runs them (the SDXL loss net's segments, SegmentedStep, ParameterwiseUpdate,
    kohya's initial LoRA, saved first as the file torch starts from): losses, gradient norms, final LoRA."""
    import mindspore as ms
    from mindspore import Tensor

    import sdxl_train_network
    from library.sdxl_original_unet import get_size_embeddings
    from library.segments import SegmentChain
    from library.train_optimizers import create_optimizer
    from library.train_step import ParameterwiseUpdate, SegmentedStep

    unet, network = _our_unet_with_lora(ckpt, 1.0)
    args = sdxl_train_network.setup_parser().parse_args(
        ["--pretrained_model_name_or_path", ckpt, "--optimizer_type", "AdamW", "--learning_rate", str(LR),
         "--max_grad_norm", str(MAX_GRAD_NORM), "--network_train_unet_only"])
    network.save_weights(lora_file, "float", {})
    param_groups, _ = network.prepare_optimizer_params(None, None, LR)
    params = [p for g in param_groups for p in g["params"]]
    loss_net = sdxl_train_network.make_sdxl_loss_net(None, None, unet)
    unet.set_train(True)
    optimizer = create_optimizer(args, param_groups)[0]
    step = SegmentedStep(SegmentChain(loss_net.segments(), loss_net.input_names, params),
                         ParameterwiseUpdate(optimizer, MAX_GRAD_NORM))
    step.set_train(True)
    losses, norms = [], []
    for i in range(STEPS):
        d = _step_inputs(i)
        size_emb = get_size_embeddings(d["time_ids"][:, 0:2], d["time_ids"][:, 2:4], d["time_ids"][:, 4:6], dim=256)
        inputs = [d["latents"], d["noise"], d["noise"], d["t"], d["sqrt_ab"], d["sqrt_1mab"], np.ones(1, np.float32),
                  d["context"], d["pooled"], size_emb.astype(np.float32), np.ones(1, np.float32),
                  np.ones((1, 1, LATENT, LATENT), np.float32)]
        loss, grads = step.loss_and_grads(*[Tensor(a) for a in inputs])
        losses.append(float(loss.asnumpy()))
        norms.append(float(np.sqrt(sum(np.square(g.asnumpy(), dtype=np.float64).sum() for g in grads))))
        step.apply_cell(loss, ms.mutable(grads))
    np.savez(out, losses=np.array(losses), norms=np.array(norms),
             **_by_lora_name(network, params, [p.asnumpy() for p in params]))


def worker_torch_steps(ckpt, lora_file, out, threads="0"):
    """kohya's three steps in torch: the same batches, AdamW (torch's defaults, as kohya's), the
    gradients clipped by ``clip_grad_norm_`` before each update; ``threads`` > 0: that many threads
    (another summation order in the kernels: torch's own rounding noise)."""
    import torch

    du, tensors = _torch_unet_with_lora(ckpt, lora_file)
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    params = [t for pair in tensors.values() for t in pair]
    optimizer = torch.optim.AdamW(params, lr=LR)
    losses, norms = [], []
    for i in range(STEPS):
        d = {k: torch.tensor(v) for k, v in _step_inputs(i).items()}
        noisy = d["sqrt_ab"].reshape(-1, 1, 1, 1) * d["latents"] + d["sqrt_1mab"].reshape(-1, 1, 1, 1) * d["noise"]
        pred = du(noisy, d["t"], d["context"],
                  added_cond_kwargs={"text_embeds": d["pooled"], "time_ids": d["time_ids"]}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), d["noise"], reduction="mean")
        loss.backward()
        losses.append(float(loss.detach()))
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out_arrays = {"losses": np.array(losses), "norms": np.array(norms)}
    for name, (down, up) in tensors.items():
        out_arrays[name + ".lora_down"] = down.detach().numpy()
        out_arrays[name + ".lora_up"] = up.detach().numpy()
    np.savez(out, **out_arrays)


def _run(worker, *args):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), worker] + [str(a) for a in args],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _checkpoint(tmp_path):
    import sdxl_checkpoint_helpers as H

    ckpt = os.environ.get("SDXL_FULL_FILE") or str(tmp_path / "sdxl_random.safetensors")
    if not os.path.exists(ckpt):
        H.write_full_size_sai(ckpt)
    return ckpt


def test_full_size_segmented_lora_gradients_match_torch(tmp_path):
    ckpt = _checkpoint(tmp_path)
    lora_file, ours, ref = tmp_path / "lora.safetensors", tmp_path / "ours.npz", tmp_path / "torch.npz"
    _run("ours", ckpt, lora_file, ours)  # one heavy process at a time
    _run("torch", ckpt, lora_file, ref)
    a, b = dict(np.load(ours)), dict(np.load(ref))
    assert set(a) == set(b) and len(a) == 2 * 722 + 1
    assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * abs(float(b["loss"]))
    errors = {k: float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in b if k != "loss"}
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    print(json.dumps({"loss": float(a["loss"]), "torch_loss": float(b["loss"]), "worst": worst}))
    assert all(np.abs(a[k]).max() > 0 for k in errors)
    assert worst[0][1] <= 1e-4, worst


if __name__ == "__main__":
    import library  # noqa: F401  (CPU ISA env before mindspore/torch)

    {"ours": worker_ours, "torch": worker_torch, "ours_steps": worker_ours_steps,
     "torch_steps": worker_torch_steps}[sys.argv[1]](*sys.argv[2:])


def _lora_errors(a, b, start):
    """Per tensor: max |a - b| over the largest update ``b`` made to that tensor."""
    return {k: float(np.abs(a[k] - b[k]).max() / np.abs(b[k] - start[k]).max()) for k in start}


def test_full_size_three_checkpointed_adamw_steps_match_torch(tmp_path):
    """kohya's first three steps replayed: losses within 1e-5 relative, gradient norms within 1e-4
    relative, and the final LoRA as close to torch's as torch's is to itself run with one thread.

    AdamW divides each gradient by its running RMS plus eps (1e-8): where a value's gradient is near
    eps (most LoRA gradients here are 1e-8..1e-6), a rounding difference in the gradient moves that
    value's update by up to lr/eps times as much. Torch with another thread count (another summation
    order) measures that floor on the same steps; ours must stay within twice it."""
    ckpt = _checkpoint(tmp_path)
    lora_file, ours, ref, ref1 = (tmp_path / n for n in ("lora0.safetensors", "ours.npz", "torch.npz", "torch1.npz"))
    _run("ours_steps", ckpt, lora_file, ours)
    _run("torch_steps", ckpt, lora_file, ref)
    _run("torch_steps", ckpt, lora_file, ref1, 1)
    from safetensors.numpy import load_file

    start = {k.replace(".weight", ""): v for k, v in load_file(lora_file).items() if k.endswith(".weight")}
    a, b, b1 = dict(np.load(ours)), dict(np.load(ref)), dict(np.load(ref1))
    assert set(a) == set(b) and len(a) == 2 * 722 + 2
    loss_rel = np.abs(a["losses"] - b["losses"]) / np.abs(b["losses"])
    norm_rel = np.abs(a["norms"] - b["norms"]) / np.abs(b["norms"])
    errors, floor = _lora_errors(a, b, start), _lora_errors(b1, b, start)
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    largest_update = max(float(np.abs(b[k] - start[k]).max()) for k in start)
    print(json.dumps({"losses": a["losses"].tolist(), "torch_losses": b["losses"].tolist(),
                      "norms": a["norms"].tolist(), "torch_norms": b["norms"].tolist(),
                      "max_error": max(float(np.abs(a[k] - b[k]).max()) for k in start),
                      "torch_1_thread_max_error": max(float(np.abs(b1[k] - b[k]).max()) for k in start),
                      "largest_update": largest_update, "worst": worst,
                      "torch_1_thread_worst": max(floor.values())}))
    assert all(np.abs(b[k] - start[k]).max() > 0 for k in start)  # every tensor trained (lora_up from zero)
    assert loss_rel.max() <= 1e-5, loss_rel
    assert norm_rel.max() <= 1e-4, norm_rel
    assert worst[0][1] <= max(1e-3, 2 * max(floor.values())), (worst, max(floor.values()))
