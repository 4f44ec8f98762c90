"""The LoRA tools run between trainings: networks/resize_lora.py, networks/svd_merge_lora.py,
networks/extract_lora_from_models.py, networks/check_lora_weights.py, tools/show_metadata.py.

Each numerical tool is compared with the same computation written here in torch from kohya's formulas
(full ``torch.linalg.svd``, kohya's rank rules, ``torch.quantile`` clamp), on tiny safetensors files in
kohya's key layout. Singular vectors are defined up to sign and LAPACK builds pick signs differently, so
the torch factors are sign-aligned with ours before kohya's clamp is applied and the factors compared.
The extracted LoRA's module names are checked against the LoRA network's names on the same model, and the
outputs are merged by the inference script's LoRA loader."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT  # noqa: E402  (imports library before mindspore)

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from library.device_utils import UserError  # noqa: E402
from library.lora_file import load_state_dict_file, read_safetensors_metadata  # noqa: E402
from library.lora_metadata import precalculate_safetensors_hashes  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tools"))
from networks import check_lora_weights, extract_lora_from_models, resize_lora, svd_merge_lora  # noqa: E402
import show_metadata  # noqa: E402

TOL = 5e-5  # relative to the largest value; the project's fp32 bound is 1e-4


# ---------------------------------------------------------------------------
# torch references (kohya's formulas)


def t_full_weight(up, down):
    """kohya merge_linear / merge_conv: (out, in[*k*k]) matrix."""
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def t_index(method, s, target):
    n = len(s)
    if method == "sv_ratio":
        index = int(torch.sum(s > s[0] / target).item())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / float(torch.sum(s)), target)) + 1
    else:
        sq = s.pow(2)
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / float(torch.sum(sq)), target ** 2)) + 1
    return max(1, min(index, n - 1))


def t_resize(up, down, alpha, rank, method=None, param=None, svd=None):
    """kohya resize_lora: (U_k*S_k, Vh_k, new_rank, new_alpha) of one module, torch float32 (``svd``: the
    product's (U, S, Vh) when already computed)."""
    u, s, vh = torch.linalg.svd(t_full_weight(up, down)) if svd is None else svd
    scale = alpha / down.shape[0]
    new_rank = t_index(method, s, param) + 1 if method else rank
    if s[0] <= 1e-6:
        new_rank = 1
    elif new_rank > rank:
        new_rank = rank
    return u[:, :new_rank] @ torch.diag(s[:new_rank]), vh[:new_rank], new_rank, float(scale * new_rank)


def t_clamped(u_s, vh, q=0.99):
    dist = torch.cat([u_s.flatten(), vh.flatten()])
    hi = torch.quantile(dist, q)
    return u_s.clamp(-hi, hi), vh.clamp(-hi, hi)


def align(ref_up, ref_down, our_down):
    """Flip the sign of each torch (up column, down row) pair to match ours."""
    ours = torch.from_numpy(our_down.reshape(our_down.shape[0], -1)).to(ref_down.dtype)
    signs = torch.sign(torch.sum(ref_down * ours, 1))
    signs[signs == 0] = 1
    return ref_up * signs, ref_down * signs[:, None]


def rel_err(ours, ref):
    ours = np.asarray(ours, np.float64).reshape(-1)
    ref = np.asarray(ref, np.float64).reshape(-1)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---------------------------------------------------------------------------
# tiny LoRA files


def _factors(rng, out, inn, rank, kernel=None, decay_range=(0.3, 0.9)):
    """lora_up/lora_down with singular values decaying geometrically at a random rate per module (so that the
    dynamic rules choose different ranks)."""
    decay = rng.uniform(*decay_range)
    width = inn * (kernel * kernel if kernel else 1)
    qu, _ = np.linalg.qr(rng.standard_normal((out, rank)))
    qd, _ = np.linalg.qr(rng.standard_normal((width, rank)))
    s = decay ** np.arange(rank) * (1 + 0.1 * rng.random(rank))
    up, down = np.ascontiguousarray(qu * s, np.float32), np.ascontiguousarray(qd.T, np.float32)
    if kernel:
        return up.reshape(out, rank, 1, 1), down.reshape(rank, inn, kernel, kernel)
    return up, down


# name -> (out, in, kernel or None); the names are of the tiny SDXL model used below
MODULES = {
    "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": (128, 128, None),
    "lora_unet_input_blocks_3_1_transformer_blocks_0_ff_net_0_proj": (1024, 128, None),
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": (128, 64, None),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (128, 128, None),
    "lora_unet_input_blocks_3_0_in_layers_2": (128, 64, 3),
    "lora_unet_input_blocks_3_0_skip_connection": (128, 64, 1),
}


def write_lora(path, seed, rank, conv_rank, alpha_of=lambda r: r / 2, metadata=None, extra=None):
    rng = np.random.default_rng(seed)
    sd = {}
    for name, (out, inn, kernel) in MODULES.items():
        r = conv_rank if kernel == 3 else rank
        up, down = _factors(rng, out, inn, r, kernel)
        sd[name + ".lora_up.weight"] = torch.from_numpy(up)
        sd[name + ".lora_down.weight"] = torch.from_numpy(down)
        sd[name + ".alpha"] = torch.tensor(float(alpha_of(r)))
    sd.update(extra or {})
    save_file(sd, path, metadata)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_tools")
    meta = {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_training_comment": "first run",
            "ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora",
            "modelspec.title": "Lora A"}
    a = write_lora(str(d / "a.safetensors"), 0, 8, 4, metadata=meta)
    b = write_lora(str(d / "b.safetensors"), 1, 4, 2, alpha_of=lambda r: 1.0)
    not_lora = str(d / "not_lora.safetensors")
    save_file({"model.weight": torch.ones(4, 4)}, not_lora, {"format": "pt"})
    return dict(dir=d, a=a, b=b, not_lora=not_lora)


def _load_torch(path):
    return {k: v.float() for k, v in load_file(path).items()}


# ---------------------------------------------------------------------------
# resize_lora


def test_resize_fixed_rank_matches_kohya(files, tmp_path):
    out = str(tmp_path / "r.safetensors")
    resize_lora.main(["--model", files["a"], "--save_to", out, "--new_rank", "4", "--new_conv_rank", "2"])
    src, got = _load_torch(files["a"]), load_file(out)
    errors = []
    for name in MODULES:
        up, down, alpha = src[name + ".lora_up.weight"], src[name + ".lora_down.weight"], src[name + ".alpha"]
        conv = down.dim() == 4  # kohya's resize gives every 4-D module (1x1 too) the conv rank
        ref_up, ref_down, k, ref_alpha = t_resize(up, down, alpha, 2 if conv else 4)
        our_up, our_down = got[name + ".lora_up.weight"].numpy(), got[name + ".lora_down.weight"].numpy()
        assert our_down.shape[0] == k and our_up.shape[1] == k
        assert tuple(our_down.shape[1:]) == tuple(down.shape[1:]) and our_up.shape[0] == up.shape[0]
        assert float(got[name + ".alpha"]) == ref_alpha and got[name + ".alpha"].dim() == 0
        ref_up, ref_down = align(ref_up, ref_down, our_down)
        errors.append(rel_err(our_up.reshape(ref_up.shape), ref_up))
        errors.append(rel_err(our_down.reshape(ref_down.shape), ref_down))
        errors.append(rel_err(t_full_weight(torch.from_numpy(our_up), torch.from_numpy(our_down)),
                              ref_up @ ref_down))
    print("resize fixed: max relative error vs torch", max(errors))
    assert max(errors) < TOL
    md = read_safetensors_metadata(out)
    assert md["ss_network_dim"] == "4"
    last = sorted(MODULES)[-1]  # kohya's ss_network_alpha: the alpha of the last module (sorted keys)
    assert md["ss_network_alpha"] == str(float(got[last + ".alpha"]))
    assert md["ss_training_comment"] == "dimension is resized from 8 to 4 (conv: 2); first run"
    assert md["modelspec.title"] == "Lora A"  # other metadata kept
    tensors, _, dtypes = load_state_dict_file(out)
    assert set(dtypes.values()) == {"fp32"}
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == precalculate_safetensors_hashes(tensors, md, dtypes)


def test_resize_dynamic_methods_match_kohya(files, tmp_path):
    for method, param in (("sv_ratio", 6.0), ("sv_cumulative", 0.8), ("sv_fro", 0.93)):
        out = str(tmp_path / f"{method}.safetensors")
        resize_lora.main(["--model", files["a"], "--save_to", out, "--new_rank", "6", "--dynamic_method", method,
                          "--dynamic_param", str(param), "--save_precision", "fp16"])
        src, got = _load_torch(files["a"]), load_file(out)
        ranks = []
        for name in MODULES:
            up, down, alpha = src[name + ".lora_up.weight"], src[name + ".lora_down.weight"], src[name + ".alpha"]
            ref_up, ref_down, k, ref_alpha = t_resize(up, down, alpha, 6, method, param)
            assert got[name + ".lora_down.weight"].shape[0] == k, (method, name)
            assert got[name + ".lora_down.weight"].dtype == torch.float16
            assert float(got[name + ".alpha"]) == pytest.approx(ref_alpha, rel=1e-3)  # fp16 alpha
            delta = t_full_weight(got[name + ".lora_up.weight"].float(), got[name + ".lora_down.weight"].float())
            assert rel_err(delta, ref_up @ ref_down) < 2e-3  # fp16 factors
            ranks.append(k)
        assert len(set(ranks)) > 1, (method, ranks)  # the rule chose different ranks per module
        md = read_safetensors_metadata(out)
        assert md["ss_network_dim"] == "Dynamic" and md["ss_network_alpha"] == "Dynamic"
        assert md["ss_training_comment"] == f"Dynamic resize with {method}: {param} from 8; first run"


# ---------------------------------------------------------------------------
# svd_merge_lora


def test_svd_merge_matches_kohya(files, tmp_path):
    out = str(tmp_path / "m.safetensors")
    ratios = (0.7, -0.5)
    svd_merge_lora.main(["--models", files["a"], files["b"], "--ratios", *map(str, ratios), "--new_rank", "6",
                         "--new_conv_rank", "3", "--save_to", out])
    got = load_file(out)
    errors = []
    for name, (out_dim, in_dim, kernel) in MODULES.items():
        weight = 0
        for path, ratio in zip((files["a"], files["b"]), ratios):
            sd = _load_torch(path)
            down = sd[name + ".lora_down.weight"]
            weight = weight + ratio * t_full_weight(sd[name + ".lora_up.weight"], down) * (
                sd[name + ".alpha"] / down.shape[0])
        k = min(3 if kernel == 3 else 6, in_dim, out_dim)
        u, s, vh = torch.linalg.svd(weight)
        our_up, our_down = got[name + ".lora_up.weight"].numpy(), got[name + ".lora_down.weight"].numpy()
        assert our_down.shape[0] == k and got[name + ".alpha"].dtype == torch.int64 and int(got[name + ".alpha"]) == k
        ref_up, ref_down = align(u[:, :k] @ torch.diag(s[:k]), vh[:k], our_down)
        ref_up, ref_down = t_clamped(ref_up, ref_down)
        errors.append(rel_err(our_up, ref_up))
        errors.append(rel_err(our_down, ref_down))
    print("svd_merge: max relative error vs torch", max(errors))
    assert max(errors) < TOL
    md = read_safetensors_metadata(out)
    assert md["ss_network_dim"] == "6" and md["ss_network_alpha"] == "6"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": 3, "conv_alpha": 3}
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.merged_from"] == "Lora A, b"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    tensors, _, dtypes = load_state_dict_file(out)
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == precalculate_safetensors_hashes(tensors, md, dtypes)


# ---------------------------------------------------------------------------
# extract_lora_from_models (tiny SDXL checkpoints)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The demo's small tiny SDXL checkpoint and a 'fine-tune' of it: low-rank changes plus noise on the U-Net
    (transformers, ResBlocks, resamplers) and both text encoders."""
    from library import safetensors_io as sio
    from library.sdxl_lora_targets import text_encoder_targets, unet_targets
    from tools.make_tiny_train_demo import write_checkpoint

    d = tmp_path_factory.mktemp("extract")
    org = str(d / "org.safetensors")
    write_checkpoint(org, seed=0, small=True)
    tuned = str(d / "tuned.safetensors")
    rng = np.random.default_rng(5)
    with sio.open_weights(org) as r:
        shapes = {k: r.shape(k) for k in r.keys()}
        changed = {key for _, key, _, _ in unet_targets(shapes, conv=True) + text_encoder_targets(shapes)}
        entries = []
        for key in r.keys():
            def produce(key=key):
                w = r.get(key).astype(np.float32)
                if key in changed:
                    m = w.reshape(w.shape[0], -1)
                    low = rng.standard_normal((m.shape[0], 3)) @ rng.standard_normal((3, m.shape[1]))
                    m = m + (0.02 * low + 1e-3 * rng.standard_normal(m.shape)).astype(np.float32)
                    w = m.reshape(w.shape)
                return w
            entries.append((key, r.raw_dtype(key), r.shape(key), produce))
        sio.write_safetensors(tuned, entries)
    return dict(dir=d, org=org, tuned=tuned)


def _network_weights(path, conv_dim):
    """({lora name: module weight as float32 numpy} of kohya's LoRA network over the checkpoint's models,
    the models (te1, te2, vae, unet))."""
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint
    from networks import lora

    te1, te2, vae, unet, _, _ = load_models_from_sdxl_checkpoint(path)
    network = lora.create_network(1.0, 4, 4, None, [te1, te2], unet, conv_dim=str(conv_dim), conv_alpha=str(conv_dim))
    return {m.lora_name: m.org_module.weight.asnumpy().astype(np.float32) for m in network.loras}, (te1, te2, vae, unet)


def _references(diff):
    """torch SVDs of one module's difference in float64 and float32 (kohya's full_matrices=True only adds
    vectors that it drops at once)."""
    mat = diff.reshape(diff.shape[0], -1)
    return {dtype: torch.linalg.svd(mat.to(dtype), full_matrices=False) for dtype in (torch.float64, torch.float32)}


def test_extract_matches_kohya_and_loads_in_inference(checkpoints, tmp_path):
    out = str(tmp_path / "extracted.safetensors")
    extract_lora_from_models.main(["--sdxl", "--model_org", checkpoints["org"], "--model_tuned", checkpoints["tuned"],
                                   "--dim", "4", "--conv_dim", "2", "--save_to", out])
    got = load_file(out)
    (w_org, models), (w_tuned, _) = _network_weights(checkpoints["org"], 2), _network_weights(checkpoints["tuned"], 2)
    # the same modules as kohya's network (U-Net with conv modules, both text encoders)
    assert {k.split(".")[0] for k in got} == set(w_org)
    assert any(k.startswith("lora_te2_") and "_q_proj" in k for k in got)
    # kohya's float32 SVD is itself off by ~1e-4 on singular vectors whose singular values are close (the noise
    # part of a difference): the reference is the same computation in float64; float32 torch is printed too
    errors = {torch.float64: [], torch.float32: []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny SVDs: threads cost more than they give, next to MindSpore's pool
    try:
        references = {name: _references(torch.from_numpy(w_tuned[name] - wo)) for name, wo in w_org.items()}
    finally:
        torch.set_num_threads(threads)
    for name, wo in w_org.items():
        diff = torch.from_numpy(w_tuned[name] - wo)
        conv3x3 = diff.dim() == 4 and tuple(diff.shape[2:]) != (1, 1)
        k = min(2 if conv3x3 else 4, diff.shape[0], diff.shape[1])
        our_up, our_down = got[name + ".lora_up.weight"].numpy(), got[name + ".lora_down.weight"].numpy()
        assert our_down.shape == (k,) + tuple(diff.shape[1:]) and float(got[name + ".alpha"]) == k
        for dtype in errors:
            u, s, vh = references[name][dtype]
            ref_up, ref_down = align(u[:, :k] @ torch.diag(s[:k]), vh[:k], our_down.astype(np.float64))
            ref_up, ref_down = t_clamped(ref_up.float(), ref_down.float())
            errors[dtype] += [rel_err(our_up, ref_up), rel_err(our_down, ref_down)]
    print("extract: max relative error over", len(w_org), "modules vs torch float64:", max(errors[torch.float64]),
          "vs torch float32:", max(errors[torch.float32]))
    assert max(errors[torch.float64]) < TOL
    md = read_safetensors_metadata(out)
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "4.0"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    # resized and svd-merged from it, the LoRAs merge in the inference script's loader, each delta where it belongs
    resized, merged = str(tmp_path / "resized.safetensors"), str(tmp_path / "merged.safetensors")
    resize_lora.main(["--model", out, "--save_to", resized, "--new_rank", "2", "--new_conv_rank", "1"])
    svd_merge_lora.main(["--models", out, resized, "--new_rank", "3", "--save_to", merged])
    from networks import lora
    from networks.lora import lora_delta
    from sdxl_minimal_inference import merge_loras

    te1, te2, vae, unet = models
    expected = {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k": w_org[
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k"].copy(),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": w_org[
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"].copy()}
    for path, multiplier in ((out, 0.5), (resized, -0.3), (merged, 0.8)):
        merge_loras([(path, multiplier)], te1, te2, vae, unet)
        sd = load_file(path)
        for name in expected:
            expected[name] += lora_delta(sd[name + ".lora_up.weight"].float().numpy(),
                                         sd[name + ".lora_down.weight"].float().numpy(),
                                         float(sd[name + ".alpha"]), multiplier)
        weights = {name: m.org_module.weight.asnumpy() for m in lora.create_network(
            1.0, 4, 4, None, [te1, te2], unet).loras for name in expected if m.lora_name == name}
        for name, value in expected.items():
            assert rel_err(weights[name], value) < 1e-6, (path, name)


def test_extract_unet_only_and_precision(checkpoints, tmp_path):
    """An unchanged text encoder (every difference under --min_diff) gives a U-Net-only LoRA; fp16 output."""
    out = str(tmp_path / "unet_only.safetensors")
    extract_lora_from_models.main(["--sdxl", "--model_org", checkpoints["org"], "--model_tuned", checkpoints["tuned"],
                                   "--dim", "2", "--min_diff", "1000", "--save_precision", "fp16",
                                   "--save_to", out, "--no_metadata"])
    got = load_file(out)
    assert got and all(k.startswith("lora_unet_") for k in got)
    assert not any("in_layers" in k for k in got)  # no conv modules without --conv_dim
    assert {v.dtype for v in got.values()} == {torch.float16}
    md = read_safetensors_metadata(out)
    assert not any(k.startswith("modelspec.") for k in md) and md["ss_network_args"] == "{}"


# ---------------------------------------------------------------------------
# check_lora_weights, show_metadata


def test_check_lora_weights_and_show_metadata(files, capsys):
    check_lora_weights.main([files["b"], "--show_all_keys"])
    lines = capsys.readouterr().out.splitlines()
    sd = _load_torch(files["b"])
    assert lines[0] == f"number of LoRA modules: {2 * len(MODULES)}"
    assert lines[1] == f"number of all modules: {len(sd)}"
    by_key = {line.split(",")[0]: line.split(",") for line in lines[2:]}
    assert set(by_key) == set(sd)
    name = "lora_unet_input_blocks_3_0_in_layers_2.lora_down.weight"
    key, shape, mean, low = by_key[name]
    assert shape == str(tuple(sd[name].size())).replace(", ", "-") == "(2-64-3-3)"
    assert float(mean) == pytest.approx(float(torch.mean(torch.abs(sd[name]))), rel=1e-6)
    assert float(low) == pytest.approx(float(torch.min(torch.abs(sd[name]))), rel=1e-6)

    show_metadata.main(["--model", files["a"]])
    printed = capsys.readouterr().out
    assert json.loads(printed) == read_safetensors_metadata(files["a"])
    assert printed.strip() == json.dumps(read_safetensors_metadata(files["a"]), indent=4, sort_keys=True)
    show_metadata.main(["--model", files["b"]])
    assert "No metadata found" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# bad inputs: one line, non-zero exit, no output


def test_bad_inputs_stop_with_one_line(files, checkpoints, tmp_path):
    out = str(tmp_path / "out.safetensors")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    mismatched = str(tmp_path / "other_model.safetensors")
    from library import safetensors_io as sio
    with sio.open_weights(checkpoints["org"]) as r:
        key = next(k for k in r.keys() if k.endswith("attn2.to_k.weight"))
        bad = [(k, r.raw_dtype(k), r.shape(k), lambda k=k: r.get(k)) for k in r.keys() if k != key]
        bad.append((key, "F32", (r.shape(key)[0], r.shape(key)[1] + 8), lambda: np.zeros(
            (r.shape(key)[0], r.shape(key)[1] + 8), np.float32)))
        sio.write_safetensors(mismatched, bad)
    from safetensors.numpy import load_file, save_file
    lora = load_file(files["a"])
    up_key = next(k for k in lora if k.endswith(".lora_up.weight") and lora[k].ndim == 2)
    (tmp_path / "bad").mkdir()
    no_up, wrong_up = str(tmp_path / "bad" / "no_up.safetensors"), str(tmp_path / "bad" / "wrong_up.safetensors")
    save_file({k: v for k, v in lora.items() if k != up_key}, no_up)
    save_file(dict(lora, **{up_key: np.zeros((lora[up_key].shape[0], lora[up_key].shape[1] + 1), np.float32)}),
              wrong_up)
    cases = [
        (resize_lora, ["--model", no_up, "--save_to", out], "but no " + up_key),
        (svd_merge_lora, ["--models", wrong_up, "--save_to", out, "--new_rank", "4"],
         "are not the two factors of one LoRA module"),
        (resize_lora, ["--model", files["not_lora"], "--save_to", out], "not a LoRA"),
        (resize_lora, ["--model", files["a"], "--save_to", out, "--new_rank", "16"], "larger than the LoRA's rank (8)"),
        # kohya's resize counts 1x1 convs (rank 8 here) as conv modules
        (resize_lora, ["--model", files["a"], "--save_to", out, "--new_rank", "4", "--new_conv_rank", "9"],
         "larger than the rank of the LoRA's conv modules (8)"),
        (resize_lora, ["--model", files["a"], "--save_to", out, "--dynamic_method", "sv_fro"], "needs --dynamic_param"),
        (resize_lora, ["--model", files["a"], "--save_to", str(blocker / "x.safetensors")], "is a file"),
        (resize_lora, ["--model", files["a"], "--save_to", files["a"]], "is an input file"),
        (svd_merge_lora, ["--models", files["a"], files["not_lora"], "--save_to", out], "not a LoRA"),
        (svd_merge_lora, ["--models", files["a"], "--ratios", "1", "2", "--save_to", out], "2 ratio(s) for 1 model"),
        (svd_merge_lora, ["--models", files["a"], "--save_to", out, "--device", "cuda"], "numpy on the CPU"),
        (extract_lora_from_models, ["--sdxl", "--model_org", checkpoints["org"], "--model_tuned", mismatched,
                                    "--save_to", out], "not the same model"),
        (extract_lora_from_models, ["--sdxl", "--model_org", files["a"], "--model_tuned", files["b"],
                                    "--save_to", out], "not an SDXL checkpoint"),
        (extract_lora_from_models, ["--model_org", checkpoints["org"], "--model_tuned", checkpoints["tuned"],
                                    "--save_to", out], "pass --sdxl"),
    ]
    for module, argv, message in cases:
        with pytest.raises(UserError) as e:
            module.main(argv)
        assert message in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))
    assert sorted(os.listdir(tmp_path)) == ["a_file", "bad", "other_model.safetensors"]  # nothing written

    # as a command: one line on stderr, exit status 2, no output file
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "networks", "resize_lora.py"), "--model",
                           files["not_lora"], "--save_to", out], capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "not a LoRA" in errors[0], proc.stderr
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------
# full size (opt-in)


@pytest.mark.slow
def test_extract_full_size_sdxl_streams(tmp_path):
    """Two full-size random SDXL checkpoints (fp16, ~7 GB each): the extraction reads one module at a time;
    its peak resident memory is printed (and must stay far below one checkpoint's size)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import sdxl_checkpoint_helpers as H

    org, tuned = str(tmp_path / "org.safetensors"), str(tmp_path / "tuned.safetensors")
    H.write_full_size_sai(org, seed=0)
    H.write_full_size_sai(tuned, seed=1)
    out = str(tmp_path / "lora.safetensors")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import library; from library.device_utils import peak_rss_gb;"
            "from networks import extract_lora_from_models as e; e.main(sys.argv[2:]);"
            "print('PEAK_RSS_GB', peak_rss_gb())")
    proc = subprocess.run([sys.executable, "-c", code, ROOT, "--sdxl", "--model_org", org, "--model_tuned", tuned,
                           "--dim", "4", "--conv_dim", "4", "--save_to", out], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = float(proc.stdout.split("PEAK_RSS_GB")[1])
    print("extract full size: peak RSS %.2f GB" % peak)
    assert peak < 3.0
    tensors, metadata, _ = load_state_dict_file(out)
    names = {k.split(".")[0] for k in tensors}
    assert sum(n.startswith("lora_te1_") for n in names) == 12 * 6
    assert sum(n.startswith("lora_te2_") for n in names) == 32 * 6
    assert sum(n.startswith("lora_unet_") for n in names) > 700


def t_thin_svd(mat):
    """kohya's ``torch.linalg.svd(mat)`` (float32), of which kohya keeps the first vectors only: thin, and of the
    transpose when the matrix is wide (the same triplets; torch's CPU SVD of a 1280x10240 matrix was measured
    4.2 s against 0.8 s for its transpose)."""
    if mat.shape[0] >= mat.shape[1]:
        return torch.linalg.svd(mat, full_matrices=False)
    v, s, uh = torch.linalg.svd(mat.T, full_matrices=False)
    return uh.T, s, v.T


def rel_fro(ours, ref):
    """||ours - ref|| / ||ref|| (Frobenius): a tensor's error relative to its own scale."""
    ours = np.asarray(ours, np.float64).reshape(-1)
    ref = np.asarray(ref, np.float64).reshape(-1)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def _full_size_unet_lora(path, seed, rank, conv_rank, alpha_of):
    """A random LoRA on every kohya U-Net target of SDXL base (transformers, ResBlocks, resamplers; 3x3 convs at
    ``conv_rank``, Linear and 1x1 modules at ``rank``, as kohya's network with ``conv_dim``). Spectra decay
    slowly (0.6-0.95 a step) so that every kept direction is well separated in float32."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import sdxl_checkpoint_helpers as H
    from library.sdxl_lora_targets import unet_targets

    rng = np.random.default_rng(seed)
    sd = {}
    for name, _, _, shape in unet_targets(H.full_size_sai_shapes(), conv=True):
        kernel = shape[2] if len(shape) == 4 else None
        r = conv_rank if kernel == 3 else rank
        up, down = _factors(rng, shape[0], shape[1], r, kernel, decay_range=(0.6, 0.95))
        sd[name + ".lora_up.weight"] = torch.from_numpy(up)
        sd[name + ".lora_down.weight"] = torch.from_numpy(down)
        sd[name + ".alpha"] = torch.tensor(float(alpha_of(r)))
    save_file(sd, path, {"ss_network_dim": str(rank), "ss_base_model_version": "sdxl_base_v1-0"})
    return sd


FULL_TOL = 1e-4  # Frobenius error relative to the tensor's norm; kohya's float32 SVD is the noise floor


@pytest.mark.slow
def test_resize_and_svd_merge_full_size_unet_lora(tmp_path):
    """Full-size SDXL U-Net LoRAs (788 modules: rank 16, conv 3x3 rank 8): resized to a fixed rank and by sv_fro,
    and two of them svd-merged, each module's ``lora_up @ lora_down`` compared with kohya's computation in torch.
    torch's full SVDs (kohya's resize and merge) took 859 s for 79 modules on the 2 shared development cores, so
    the torch reference covers the first module of every distinct shape (30 shapes) and every 16th module (79 in
    all); every module's ranks, alphas and shapes are checked."""
    import time

    t0 = time.time()
    a_path, b_path = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    lora_a = _full_size_unet_lora(a_path, 0, 16, 8, lambda r: r / 2)
    lora_b = _full_size_unet_lora(b_path, 1, 8, 4, lambda r: 1.0)
    names = sorted({k.split(".")[0] for k in lora_a})
    assert len(names) == 788
    seen, checked = set(), []
    for i, name in enumerate(names):
        shape = tuple(lora_a[name + ".lora_up.weight"].shape[:1]) + tuple(lora_a[name + ".lora_down.weight"].shape[1:])
        if shape not in seen or i % 16 == 0:
            checked.append(name)
        seen.add(shape)
    t_write = time.time() - t0

    fixed, dynamic, merged = (str(tmp_path / f) for f in ("fixed.safetensors", "dyn.safetensors", "m.safetensors"))
    t0 = time.time()
    resize_lora.main(["--model", a_path, "--save_to", fixed, "--new_rank", "8", "--new_conv_rank", "4"])
    resize_lora.main(["--model", a_path, "--save_to", dynamic, "--new_rank", "16", "--dynamic_method", "sv_fro",
                      "--dynamic_param", "0.9"])
    ratios = (0.7, -0.5)
    svd_merge_lora.main(["--models", a_path, b_path, "--ratios", *map(str, ratios), "--new_rank", "16",
                         "--new_conv_rank", "8", "--save_to", merged])
    t_tools = time.time() - t0
    got = {what: load_file(path) for what, path in (("fixed", fixed), ("dynamic", dynamic), ("merged", merged))}

    # every module: kohya's shapes and alphas (fixed rank; every 4-D module gets the conv rank in resize, only 3x3
    # ones in svd_merge); the dynamic ranks are checked against torch below
    dynamic_ranks = []
    for name in names:
        down = lora_a[name + ".lora_down.weight"]
        conv, conv3x3 = down.dim() == 4, down.dim() == 4 and down.shape[2] == 3
        k = 4 if conv else 8
        assert tuple(got["fixed"][name + ".lora_down.weight"].shape) == (k,) + tuple(down.shape[1:])
        assert float(got["fixed"][name + ".alpha"]) == float(lora_a[name + ".alpha"] / down.shape[0] * k)
        m = 8 if conv3x3 else 16
        assert tuple(got["merged"][name + ".lora_down.weight"].shape) == (m,) + tuple(down.shape[1:])
        assert int(got["merged"][name + ".alpha"]) == m
        dynamic_ranks.append(got["dynamic"][name + ".lora_down.weight"].shape[0])
    assert len(set(dynamic_ranks)) > 3, sorted(set(dynamic_ranks))

    t0 = time.time()
    errors = {"fixed": [], "dynamic": [], "merged": []}
    for name in checked:
        up, down, alpha = (lora_a[name + s] for s in (".lora_up.weight", ".lora_down.weight", ".alpha"))
        conv, conv3x3 = down.dim() == 4, down.dim() == 4 and down.shape[2] == 3
        svd = t_thin_svd(t_full_weight(up, down))
        for what, rank, method in (("fixed", 4 if conv else 8, None), ("dynamic", 16, "sv_fro")):
            ref_up, ref_down, k, ref_alpha = t_resize(up, down, alpha, rank, method, 0.9, svd=svd)
            our = got[what]
            assert our[name + ".lora_down.weight"].shape[0] == k, (what, name)
            assert float(our[name + ".alpha"]) == ref_alpha, (what, name)
            errors[what].append(rel_fro(t_full_weight(our[name + ".lora_up.weight"], our[name + ".lora_down.weight"]),
                                        ref_up @ ref_down))
        # kohya's svd_merge: ratio * scale * the module's weight (3x3 convs through conv2d, as kohya), SVD,
        # U*S and Vh clamped to the 0.99 quantile of their values together
        weight = 0
        for sd, ratio in ((lora_a, ratios[0]), (lora_b, ratios[1])):
            u_w, d_w, a_w = (sd[name + s] for s in (".lora_up.weight", ".lora_down.weight", ".alpha"))
            if conv3x3:
                part = torch.nn.functional.conv2d(d_w.permute(1, 0, 2, 3), u_w).permute(1, 0, 2, 3)
            else:
                part = t_full_weight(u_w, d_w).reshape(u_w.shape[0], *d_w.shape[1:])
            weight = weight + ratio * part * (a_w / d_w.shape[0])
        k = 8 if conv3x3 else 16
        u, s, vh = t_thin_svd(weight.reshape(weight.shape[0], -1))
        our_up, our_down = got["merged"][name + ".lora_up.weight"], got["merged"][name + ".lora_down.weight"]
        # kohya's quantile is of signed values: LAPACK's sign choice moves it, so align the signs first
        ref_up, ref_down = t_clamped(*align(u[:, :k] @ torch.diag(s[:k]), vh[:k], our_down.numpy()))
        errors["merged"].append(rel_fro(t_full_weight(our_up, our_down), ref_up @ ref_down))
    t_ref = time.time() - t0
    print(f"full size: {len(names)} modules, torch reference on {len(checked)}; write {t_write:.0f} s, "
          f"tools {t_tools:.0f} s, torch reference {t_ref:.0f} s; dynamic ranks {min(dynamic_ranks)}-"
          f"{max(dynamic_ranks)}; max relative error (Frobenius) "
          + ", ".join(f"{k} {max(v):.2e}" for k, v in errors.items()))
    for what, values in errors.items():
        assert max(values) < FULL_TOL, (what, max(values))


# ---------------------------------------------------------------------------
# a resized LoRA's merged U-Net output against the original's (bench/bench_resize_lora.py)


def test_resized_lora_unet_error_falls_with_rank(checkpoints):
    """The U-Net output with the resized LoRA merged approaches the original LoRA's as the rank rises, and equals
    it (to fp32 rounding) at the source rank; bench/bench_resize_lora.py prints the same rows for more ranks."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_resize_lora as B

    lora = B.write_lora(checkpoints["org"], str(checkpoints["dir"] / "decaying_r8.safetensors"), rank=8)
    rows, info = B.measure(checkpoints["org"], lora, [("rank", r) for r in (1, 4, 8)], latent_size=8,
                           work=str(checkpoints["dir"]))
    print("resized LoRA U-Net error / LoRA effect by rank:", {r["param"]: r["err_effect"] for r in rows[1:]},
          "LoRA effect / output:", info["effect_vs_output"])
    assert info["effect_vs_output"] > 0.05  # the LoRA changes the output: the errors below are not vacuous
    assert rows[0]["method"] == "source"
    # each LoRA is merged into the U-Net whose weights were restored after the previous one: the source-rank
    # row's ~0 also shows that no earlier merge is left in the weights
    errors = [r["err_effect"] for r in rows[1:]]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] <= 1e-5, errors
    assert rows[-1]["params_kept"] == 1.0 and rows[1]["params_kept"] < 0.2
