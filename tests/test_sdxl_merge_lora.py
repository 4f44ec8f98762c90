"""networks/sdxl_merge_lora.py: LoRAs merged into an SAI checkpoint give the same U-Net and text-encoder
outputs as the base model with the LoRAs applied (unmerged forward); --concat is exact; the default LoRA
merge follows kohya's formula; precisions; one-line errors."""
import os

import numpy as np
import pytest

from conftest import assert_close  # noqa: E402  (imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from library.device_utils import UserError  # noqa: E402
from library.lora_file import load_state_dict_file  # noqa: E402
from library.sdxl_model_util import load_models_from_sdxl_checkpoint  # noqa: E402
from networks import lora  # noqa: E402
from networks import sdxl_merge_lora as sml  # noqa: E402
from test_sdxl_minimal_inference import TE1, TE2, _checkpoint_and_loras, _kohya_lora  # noqa: E402


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)  # tiny models: no graph compilation
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_lora")
    _, ckpt, loras = _checkpoint_and_loras(d, "base.safetensors", ((1, 4), (2, 4), (3, 2)))
    rng = np.random.default_rng(0)
    ids = np.zeros((1, 77), np.int32)
    ids[0, :6] = [49406, 320, 1125, 539, 320, 49407]
    inputs = dict(x=rng.standard_normal((1, 4, 8, 8)).astype(np.float32), t=np.array([500.0], np.float32),
                  context=rng.standard_normal((1, 7, TE1["hidden_size"] + TE2["hidden_size"])).astype(np.float32),
                  y=rng.standard_normal((1, TE2["projection_dim"] + 6 * 8)).astype(np.float32), ids=ids)
    return dict(dir=d, ckpt=ckpt, loras=loras, inputs=inputs)


def _outputs(te1, te2, unet, inp):
    for m in (te1, te2, unet):
        m.set_train(False)
    ids = Tensor(inp["ids"])
    eps = unet(Tensor(inp["x"]), Tensor(inp["t"]), Tensor(inp["context"]), Tensor(inp["y"])).asnumpy()
    return {"unet": eps, "te1": te1(ids)[0].asnumpy(), "te2": te2(ids)[2].asnumpy()}


def _applied(ckpt, lora_path, multiplier):
    """Base model with one LoRA applied as extra modules (not merged)."""
    te1, te2, _, unet, _, _ = load_models_from_sdxl_checkpoint(ckpt)
    net, _ = lora.create_network_from_weights(multiplier, lora_path, None, [te1, te2], unet)
    net.apply_to([te1, te2], unet)
    net.load_weights(lora_path)
    net.set_multiplier(multiplier)
    return te1, te2, unet


def _merged(ckpt):
    te1, te2, _, unet, _, _ = load_models_from_sdxl_checkpoint(ckpt)
    return te1, te2, unet


def _run(argv):
    sml.main(argv + ["--device_target", "CPU", "--pynative"])


def _compare(a, b, base=None):
    errs = {k: assert_close(a[k], b[k], what=k) for k in ("unet", "te1", "te2")}
    if base is not None:
        for k in errs:
            assert np.abs(b[k] - base[k]).max() > 1e-2, f"the LoRA does not change {k}"
    return errs


def test_merged_checkpoint_equals_applied_lora(setup, tmp_path):
    out = str(tmp_path / "merged.safetensors")
    _run(["--sd_model", setup["ckpt"], "--save_to", out, "--models", setup["loras"][0], "--ratios", "0.7"])
    inp = setup["inputs"]
    base = _outputs(*_merged(setup["ckpt"]), inp)
    errs = _compare(_outputs(*_merged(out), inp), _outputs(*_applied(setup["ckpt"], setup["loras"][0], 0.7), inp),
                    base)
    print("merged checkpoint vs applied LoRA, max abs err:", errs)
    from library.lora_file import read_safetensors_metadata
    meta = read_safetensors_metadata(out)
    assert meta["modelspec.title"] == "merged" and "lora0" in meta["modelspec.merged_from"]


def test_two_loras_checkpoint_equals_concat_lora(setup, tmp_path):
    """Two LoRAs (ranks 4 and 2, ratios 0.7 and -0.4) merged into the checkpoint == the base model with their
    --concat merge applied at multiplier 1 (exact concatenation)."""
    models = [setup["loras"][0], setup["loras"][2]]
    out = str(tmp_path / "merged2.safetensors")
    cat = str(tmp_path / "concat.safetensors")
    _run(["--sd_model", setup["ckpt"], "--save_to", out, "--models", *models, "--ratios", "0.7", "-0.4"])
    _run(["--save_to", cat, "--models", *models, "--ratios", "0.7", "-0.4", "--concat", "--shuffle"])
    sd, meta, _ = load_state_dict_file(cat)
    name = next(k for k in sd if k.endswith(".lora_down.weight"))
    alpha = np.asarray(sd[name.replace("lora_down.weight", "alpha")]).reshape(-1)[0]
    assert sd[name].shape[0] == 6 and float(alpha) == 6.0
    assert meta["ss_network_dim"] == "6" and "sshs_model_hash" in meta
    inp = setup["inputs"]
    errs = _compare(_outputs(*_merged(out), inp), _outputs(*_applied(setup["ckpt"], cat, 1.0), inp))
    print("two LoRAs: merged checkpoint vs applied concat LoRA, max abs err:", errs)


def test_lora_merge_follows_kohya_formula(setup, tmp_path):
    out = str(tmp_path / "sum.safetensors")
    _run(["--save_to", out, "--models", setup["loras"][0], setup["loras"][1], "--ratios", "0.8", "-0.5",
          "--save_precision", "fp16"])
    got, meta, dtypes = load_state_dict_file(out)
    a, _, _ = load_state_dict_file(setup["loras"][0])
    b, _, _ = load_state_dict_file(setup["loras"][1])
    assert set(got) == set(a) and set(dtypes.values()) == {"fp16"}
    for key in got:
        if key.endswith("alpha"):
            want = a[key]
        else:
            # scale = sqrt(alpha/base_alpha) * ratio, abs() for lora_up (both LoRAs have the same alpha here)
            s0, s1 = 0.8, -0.5
            if "lora_up" in key:
                s0, s1 = abs(s0), abs(s1)
            want = np.float32(s0) * a[key].astype(np.float32) + np.float32(s1) * b[key].astype(np.float32)
        np.testing.assert_allclose(got[key].astype(np.float32), want, rtol=2e-3, atol=2e-3, err_msg=key)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"


def test_merge_into_new_folder_with_ordinary_mode(setup, tmp_path):
    """--save_to's folder is created (as training and inference create theirs); the files get 0666 minus the
    umask, not the temporary file's 0600 nor MindSpore's 0400 for .ckpt."""
    old = os.umask(0o022)
    try:
        for name in ("a/b/merged.safetensors", "c/merged.ckpt"):
            out = tmp_path / name
            _run(["--save_to", str(out), "--models", setup["loras"][0], setup["loras"][1]])
            assert out.is_file() and oct(out.stat().st_mode & 0o777) == oct(0o644), name
        os.umask(0o027)
        out = tmp_path / "d" / "merged.safetensors"
        _run(["--save_to", str(out), "--models", setup["loras"][0]])
        assert oct(out.stat().st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(old)
    assert not [f for f in os.listdir(tmp_path / "a" / "b") if f.startswith(".tmp")]


def test_checkpoint_save_precision_and_ckpt(setup, tmp_path):
    out = str(tmp_path / "merged.ckpt")
    _run(["--sd_model", setup["ckpt"], "--save_to", out, "--models", setup["loras"][1], "--save_precision", "fp16"])
    te1, te2, unet = _merged(out)
    ref = _outputs(*_applied(setup["ckpt"], setup["loras"][1], 1.0), setup["inputs"])
    got = _outputs(te1, te2, unet, setup["inputs"])
    for k in got:  # fp16 weights: loose bound
        assert_close(got[k], ref[k], rtol_scale=2e-2, what=k)


def test_errors(setup, tmp_path):
    out = str(tmp_path / "o.safetensors")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--sd_model", str(tmp_path / "none.safetensors"), "--save_to", out, "--models", setup["loras"][0]],
         "checkpoint not found"),
        (["--save_to", out, "--models", str(tmp_path / "none.safetensors")], "LoRA file not found"),
        (["--save_to", out, "--models", setup["loras"][0], "--ratios", "1", "2"], "one per model"),
        (["--save_to", str(tmp_path / "afile" / "o.safetensors"), "--models", setup["loras"][0]],
         "o.safetensors: output folder .*afile: is a file, not a folder"),
        (["--save_to", str(tmp_path), "--models", setup["loras"][0]], "unsupported extension"),
        (["--save_to", out, "--models", setup["loras"][0], "--lbws", "1,1"], "not implemented"),
        (["--save_to", out, "--models", setup["loras"][0], setup["loras"][2]], "only with --concat"),
        (["--models", setup["loras"][0]], "--save_to is required"),
    ]
    for argv, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            _run(argv)
        assert "\n" not in str(e.value)
        assert not os.path.exists(out)
    from safetensors.torch import save_file
    sd = {k: v for k, v in _kohya_lora(__import__("test_sdxl_minimal_inference")._torch_models(), 5).items()}
    key = next(k for k in sd if k.startswith("lora_te2_") and k.endswith("lora_up.weight"))
    sd[key] = torch.zeros(3, 4)
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    with pytest.raises(UserError, match="bad.safetensors.*shape"):
        _run(["--sd_model", setup["ckpt"], "--save_to", out, "--models", bad])
    assert not os.path.exists(out)
