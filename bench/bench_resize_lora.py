"""A resized LoRA's merged U-Net output against the original LoRA's: relative error by rank
(``networks/resize_lora.py``, fixed ranks and kohya's dynamic methods).

    python bench/bench_resize_lora.py
    python bench/bench_resize_lora.py --ckpt sd_xl_base_1.0.safetensors --lora my_lora.safetensors --latent_size 32

Without ``--ckpt`` the model is the tiny SDXL-topology demo checkpoint (``tools/make_tiny_train_demo.py``,
random weights); without ``--lora`` the LoRA is written on every kohya U-Net target of the checkpoint (conv
modules included: ``--rank``, 3x3 convs ``--conv_rank``), each module's singular values decaying geometrically
at a random rate between 0.5 and 0.9 a step (a trained LoRA's spectrum decays too; a flat one would make every
dropped direction cost the same), its largest ``--strength`` times the weight's RMS singular value.

The LoRA is resized by ``networks/resize_lora.py`` to each fixed rank (powers of two below the source rank and
the source rank; ``--new_conv_rank`` the same, at most the largest rank of the file's conv modules) and by each
dynamic method at a few targets. kohya's resize gives every conv module (1x1 too) the conv rank while its network
gives 1x1 modules the Linear rank, so with ``--conv_rank`` below ``--rank`` the 3x3 modules of the source-rank
row are padded with empty directions (params above 100%, no error); each file is merged into the U-Net
(``sdxl_minimal_inference.merge_loras``, what ``--lora_weights`` runs) and the U-Net run on the same latents,
timestep and (random) conditioning. Columns: "mean rank" of the modules, "params" kept (fraction of the
original LoRA's), "err/effect" = ||out - out_original|| / ||out_original - out_base|| (the part of the LoRA's
effect that the resize loses), "err/output" = ||out - out_original|| / ||out_original|| (Frobenius norms).
"""
import argparse
import json
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import library  # noqa: E402,F401  (CPU runtime env before mindspore loads)

DYNAMIC = (("sv_fro", (0.5, 0.9, 0.99)), ("sv_ratio", (2.0, 8.0, 32.0)), ("sv_cumulative", (0.5, 0.9)))


def write_lora(ckpt, path, rank=16, conv_rank=None, seed=0, strength=0.5):
    """A U-Net LoRA on the checkpoint's kohya targets (alpha = rank / 2) with decaying spectra; -> path."""
    import numpy as np

    from library.lora_file import save_state_dict_file
    from library.safetensors_io import open_weights
    from library.sdxl_lora_targets import unet_targets

    conv_rank = rank if conv_rank is None else conv_rank
    rng = np.random.default_rng(seed)
    sd = {}
    with open_weights(ckpt) as reader:
        for name, key, _, shape in unet_targets({k: reader.shape(k) for k in reader.keys()}, conv=True):
            kernel = shape[2] if len(shape) == 4 else 1
            r = conv_rank if kernel == 3 else rank
            out_dim, width = shape[0], int(np.prod(shape[1:]))
            w = np.asarray(reader.get(key), np.float32)
            rms_sv = float(np.linalg.norm(w)) / np.sqrt(min(out_dim, width))
            s = strength * rms_sv * rng.uniform(0.5, 0.9) ** np.arange(r) * (1 + 0.1 * rng.random(r))
            qu, _ = np.linalg.qr(rng.standard_normal((out_dim, r)))
            qd, _ = np.linalg.qr(rng.standard_normal((width, r)))
            alpha = r / 2
            up = (qu * s / (alpha / r)).astype(np.float32)  # the merge scales by alpha / rank
            down = qd.T.astype(np.float32)
            if len(shape) == 4:
                up, down = up.reshape(out_dim, r, 1, 1), down.reshape(r, *shape[1:])
            sd[name + ".lora_up.weight"] = np.ascontiguousarray(up)
            sd[name + ".lora_down.weight"] = np.ascontiguousarray(down)
            sd[name + ".alpha"] = np.asarray(alpha, np.float32)
    save_state_dict_file(path, sd, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                    "ss_network_alpha": str(rank / 2)})
    return path


def _ranks(path):
    """{module: (rank, parameter count)} of a LoRA file."""
    from library.lora_file import load_state_dict_file

    tensors, _, _ = load_state_dict_file(path)
    out = {}
    for key, value in tensors.items():
        if key.endswith(".lora_down.weight"):
            module = key[:-len(".lora_down.weight")]
            out[module] = (value.shape[0], value.size + tensors[module + ".lora_up.weight"].size)
    return out


def default_specs(path):
    """Fixed ranks (powers of two below the source rank, and the source rank) and dynamic targets."""
    ranks = _ranks(path)
    top = max(r for r, _ in ranks.values())
    fixed = sorted({2 ** i for i in range(top.bit_length()) if 2 ** i < top} | {top})
    return [("rank", r) for r in fixed] + [(m, p) for m, params in DYNAMIC for p in params]


def measure(ckpt, lora, specs, latent_size=16, seed=0, work=None):
    """Rows {method, param, mean_rank, params_kept, err_effect, err_output} of each resize in ``specs``
    ([("rank", r)] or [(dynamic method, target)]), plus the source LoRA's row ("source")."""
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor

    from library.safetensors_io import open_weights
    from library.sdxl_checkpoint_keys import UNET_PREFIX
    from library.sdxl_lora_targets import unet_targets
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint
    from networks import resize_lora
    from sdxl_minimal_inference import merge_loras

    ms.set_context(mode=ms.PYNATIVE_MODE)  # one forward per LoRA: compiling a graph would cost more
    te1, te2, vae, unet, _, _ = load_models_from_sdxl_checkpoint(ckpt)
    cfg = unet.config
    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal((1, cfg.in_channels, latent_size, latent_size)).astype(np.float32))
    t = Tensor(np.array([500.0], np.float32))
    ctx = Tensor(rng.standard_normal((1, 77, cfg.context_dim)).astype(np.float32))
    y = Tensor(rng.standard_normal((1, cfg.adm_in_channels)).astype(np.float32))

    # the U-Net weights a LoRA changes are restored from the checkpoint between LoRAs (exact: the model was
    # loaded from it), so no second copy of the U-Net is held
    params = {p.name: p for p in unet.get_parameters()}
    reader = open_weights(ckpt)
    keys = {name: key for name, key, _, _ in unet_targets({k: reader.shape(k) for k in reader.keys()}, conv=True)}

    def run(path):
        if path is None:
            return unet(x, t, ctx, y).asnumpy().astype(np.float64)
        merge_loras([(path, 1.0)], te1, te2, vae, unet)
        out = unet(x, t, ctx, y).asnumpy().astype(np.float64)
        for module in _ranks(path):
            if module in keys:
                key = keys[module]
                param = params[key[len(UNET_PREFIX):]]
                param.set_data(Tensor(np.asarray(reader.get(key), np.float32), dtype=param.dtype))
        return out

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)  # resize_lora and merge_loras log every file
    try:
        base = run(None)
        original = run(lora)
        effect = np.linalg.norm(original - base)
        src = _ranks(lora)
        src_params = sum(n for _, n in src.values())
        rows = []
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            for method, param in [("source", None)] + list(specs):
                if method == "source":
                    path = lora
                else:
                    path = os.path.join(tmp, f"{method}_{param}.safetensors")
                    top = max(r for r, _ in src.values())
                    conv_top = max([r for m, (r, _) in src.items() if m in keys and len(reader.shape(keys[m])) == 4]
                                   or [top])
                    if method == "rank":
                        argv = ["--new_rank", str(param), "--new_conv_rank", str(min(param, conv_top))]
                    else:
                        argv = ["--new_rank", str(top), "--dynamic_method", method, "--dynamic_param", str(param)]
                    resize_lora.main(["--model", lora, "--save_to", path] + argv)
                    logging.getLogger().setLevel(logging.WARNING)
                ranks = _ranks(path)
                out = original if path == lora else run(path)
                err = np.linalg.norm(out - original)
                rows.append({"method": method, "param": param,
                             "mean_rank": float(np.mean([r for r, _ in ranks.values()])),
                             "params_kept": sum(n for _, n in ranks.values()) / src_params,
                             "err_effect": float(err / effect), "err_output": float(err / np.linalg.norm(original))})
    finally:
        logging.getLogger().setLevel(quiet)
        reader.close()
    return rows, {"effect_vs_output": float(effect / np.linalg.norm(original)), "modules": len(src)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="SDXL checkpoint (SAI .safetensors or MindSpore .ckpt); default: tiny model")
    parser.add_argument("--lora", help="LoRA to resize; default: a random U-Net LoRA written on the checkpoint")
    parser.add_argument("--rank", type=int, default=16, help="rank of the default LoRA (Linear and 1x1 modules)")
    parser.add_argument("--conv_rank", type=int, default=None,
                        help="rank of the default LoRA's 3x3 conv modules (default: --rank)")
    parser.add_argument("--strength", type=float, default=0.5,
                        help="the default LoRA's largest singular value per module, times the weight's RMS one")
    parser.add_argument("--latent_size", type=int, default=16, help="latent height and width (pixels / 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as work:
        ckpt = args.ckpt
        if ckpt is None:
            from tools.make_tiny_train_demo import write_checkpoint

            ckpt = os.path.join(work, "tiny.safetensors")
            write_checkpoint(ckpt, seed=args.seed)
        lora = args.lora or write_lora(ckpt, os.path.join(work, "lora.safetensors"), args.rank, args.conv_rank,
                                       args.seed, args.strength)
        t0 = time.time()
        rows, info = measure(ckpt, lora, default_specs(lora), args.latent_size, args.seed, work)
        seconds = time.time() - t0
    source = args.lora or f"random LoRA rank {args.rank} / conv {args.conv_rank or args.rank}"
    print(f"{'tiny demo model' if args.ckpt is None else args.ckpt}, {source}: "
          f"{info['modules']} modules; the LoRA changes the U-Net output by {info['effect_vs_output']:.3f} of its "
          f"norm; latents {args.latent_size}x{args.latent_size}, t=500")
    print(f"{'resize':>20} {'mean rank':>10} {'params':>7} {'err/effect':>11} {'err/output':>11}")
    for r in rows:
        label = "source" if r["method"] == "source" else (
            f"--new_rank {r['param']}" if r["method"] == "rank" else f"{r['method']} {r['param']}")
        print(f"{label:>20} {r['mean_rank']:>10.2f} {r['params_kept']:>7.1%} {r['err_effect']:>11.2e} "
              f"{r['err_output']:>11.2e}")
    print(f"({seconds:.0f} s)")
    print("RESULT " + json.dumps({"rows": rows, **info, "seconds": seconds}))


if __name__ == "__main__":
    main()
