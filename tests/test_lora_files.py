"""LoRA files: kohya metadata and hashes (recomputed with torch + kohya's algorithm),
save precision, .ckpt, tools/convert_weights.py round trips (bit-exact), and the
one-line error of every bad-file case (nothing written, nothing partly merged)."""
import hashlib
import json
import os
import subprocess
import sys
from argparse import Namespace
from io import BytesIO

import numpy as np
import pytest

from conftest import ROOT  # noqa: E402  (imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from library import clip_text_model as ctm  # noqa: E402
from library import layers, lora_file, lora_metadata  # noqa: E402
from library.device_utils import UserError  # noqa: E402
from networks import lora  # noqa: E402
from tools import convert_weights  # noqa: E402

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _kohya_hashes(tensors, metadata):
    """kohya train_util.precalculate_safetensors_hashes, verbatim algorithm, on torch tensors."""
    md = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors_torch.save(tensors, md))
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model_hash = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return model_hash, legacy


@pytest.fixture()
def te_net():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    layers.set_init_seed(0)
    te = ctm.CLIPTextModel(ctm.CLIPTextConfig.tiny())
    net = lora.create_network(1.0, 4, 2.0, None, te, None)
    rng = np.random.default_rng(0)
    for m in net.loras:
        m.lora_up.weight.set_data(Tensor(rng.standard_normal(m.lora_up.weight.shape).astype(np.float32)))
    return te, net


def _args(**kw):
    base = dict(output_name="my_lora", learning_rate=1e-4, unet_lr=None, network_module="networks.lora",
                network_dim=4, network_alpha=2.0, network_args=["conv_dim=4"], v2=False, v_parameterization=False,
                resolution="1024,1024", clip_skip=None, min_timestep=None, max_timestep=None,
                metadata_title=None, metadata_author="me", metadata_description=None, metadata_license=None,
                metadata_tags="a,b", metadata_trigger_phrase="sks", pretrained_model_name_or_path="base.safetensors",
                vae=None, seed=42, mixed_precision="fp16")
    base.update(kw)
    return Namespace(**base)


@pytest.mark.parametrize("precision", [None, "fp16", "bf16"])
def test_save_metadata_hashes_and_precision(te_net, tmp_path, precision):
    _, net = te_net
    args = _args()
    md = lora_metadata.build_training_metadata(args, session_id=123, training_started_at=1700000000.0,
                                               network_kwargs={"conv_dim": "4"},
                                               dataset_metadata={"ss_num_train_images": 10})
    md.update(lora_metadata.get_sai_model_spec(args, timestamp=1700000000.0))
    path = str(tmp_path / "lora.safetensors")
    net.save_weights(path, precision, md)

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = header["__metadata__"]
    for key, want in (("ss_network_module", "networks.lora"), ("ss_network_dim", "4"), ("ss_network_alpha", "2.0"),
                      ("ss_network_args", '{"conv_dim": "4"}'), ("ss_base_model_version", "sdxl_base_v1-0"),
                      ("ss_num_train_images", "10"), ("ss_sd_model_name", "base.safetensors"),
                      ("ss_mixed_precision", "fp16"), ("ss_v2", "False"), ("ss_session_id", "123"),
                      ("modelspec.sai_model_spec", "1.0.1"),
                      ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
                      ("modelspec.implementation", "https://github.com/Stability-AI/generative-models"),
                      ("modelspec.title", "my_lora"), ("modelspec.resolution", "1024x1024"),
                      ("modelspec.author", "me"), ("modelspec.tags", "a,b"), ("modelspec.trigger_phrase", "sks"),
                      ("modelspec.prediction_type", "epsilon")):
        assert meta[key] == want, key
    assert meta["modelspec.implementation_version"].startswith("sd-scripts-mindspore/")
    assert "ss_sd_scripts_commit_hash" in meta and "modelspec.date" in meta

    # read back with torch; recompute kohya's hashes from what is in the file
    loaded = safetensors_torch.load_file(path)
    want_dtype = {None: torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert all(v.dtype == want_dtype for v in loaded.values())
    assert set(loaded) == set(net.state_dict())
    model_hash, legacy = _kohya_hashes(loaded, meta)
    assert meta["sshs_model_hash"] == model_hash and meta["sshs_legacy_hash"] == legacy
    # our bytes are the bytes torch's safetensors writes (its metadata key order varies between runs:
    # compare the header as JSON, the rest byte for byte; bf16 header rewrite included)
    with open(path, "rb") as f:
        ours = f.read()
    theirs = safetensors_torch.save(loaded, meta)
    n, m = int.from_bytes(ours[:8], "little"), int.from_bytes(theirs[:8], "little")
    assert n == m and json.loads(ours[8:8 + n]) == json.loads(theirs[8:8 + m]) and ours[8 + n:] == theirs[8 + m:]
    # values: the fp32 weights rounded as torch rounds them
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(loaded[k].float().numpy(), torch.from_numpy(v).to(want_dtype).float().numpy())


def test_ckpt_save_and_load_weights(te_net, tmp_path):
    te, net = te_net
    path = str(tmp_path / "lora.ckpt")
    net.save_weights(path, "fp16", {"ss_network_dim": "4"})
    tensors, meta, dtypes = lora_file.load_state_dict_file(path)
    assert meta == {"ss_network_dim": "4"} and set(dtypes.values()) == {"fp16"}
    assert set(tensors) == set(net.state_dict())
    layers.set_init_seed(0)
    te2 = ctm.CLIPTextModel(ctm.CLIPTextConfig.tiny())
    net2, _ = lora.create_network_from_weights(1.0, path, None, te2, None)
    net2.apply_to(te2, None)
    missing, unexpected = net2.load_weights(path)
    assert not missing and not unexpected
    for k, v in net2.state_dict().items():
        np.testing.assert_array_equal(v, net.state_dict()[k].astype(np.float16).astype(np.float32))



@pytest.mark.parametrize("precision", [None, "fp16", "bf16"])
def test_pt_save_is_torch_save_and_loads_everywhere(te_net, tmp_path, precision):
    """--save_model_as pt: kohya's save_weights writes torch.save(state_dict) (no metadata). Ours, written
    without torch, loads with torch.load(weights_only=True, also mmap) to the same tensors as the safetensors
    file of the same network, and here (reader, network loading, inference merge, convert tool)."""
    import zipfile

    te, net = te_net
    pt, st = str(tmp_path / "lora.pt"), str(tmp_path / "lora.safetensors")
    old_umask = os.umask(0o022)
    try:
        net.save_weights(pt, precision, {"ss_network_dim": "4"})
    finally:
        os.umask(old_umask)
    net.save_weights(st, precision, {"ss_network_dim": "4"})
    assert oct(os.stat(pt).st_mode & 0o777) == oct(0o644)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]
    want_dtype = {None: torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    reference = safetensors_torch.load_file(st)
    for kwargs in ({}, {"mmap": True}):
        loaded = torch.load(pt, weights_only=True, **kwargs)
        assert type(loaded).__name__ == "OrderedDict" and list(loaded) == list(net.state_dict())
        for k, v in loaded.items():
            assert v.dtype == want_dtype and v.shape == reference[k].shape and v.is_contiguous(), k
            assert torch.equal(v, reference[k]), k
    with zipfile.ZipFile(pt) as z:  # torch's layout: records under the file's stem, storages 64-byte aligned
        names = z.namelist()
        assert names[0] == "lora/data.pkl" and "lora/version" in names and z.read("lora/byteorder") == b"little"
        raw = open(pt, "rb").read()
        for info in z.infolist():
            name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
                int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    # the bytes depend only on the tensors (no random serialization id)
    again = str(tmp_path / "again" / "lora.pt")
    os.makedirs(os.path.dirname(again))
    net.save_weights(again, precision, None)
    assert open(again, "rb").read() == raw

    tensors, meta, dtypes = lora_file.load_state_dict_file(pt)
    st_tensors, _, st_dtypes = lora_file.load_state_dict_file(st)
    assert meta == {} and dtypes == st_dtypes and list(tensors) == list(net.state_dict())  # kohya's order
    for k in tensors:
        assert tensors[k].dtype == st_tensors[k].dtype and tensors[k].shape == st_tensors[k].shape
        np.testing.assert_array_equal(tensors[k], st_tensors[k])
    assert lora_file.read_torch_pickle(pt)[2] == dtypes

    # training-side loading and the inference merge (sdxl_minimal_inference.merge_loras' calls)
    merged = {}
    for path in (pt, st):
        layers.set_init_seed(0)
        te2 = ctm.CLIPTextModel(ctm.CLIPTextConfig.tiny())
        net2, _ = lora.create_network_from_weights(1.0, path, None, te2, None)
        net2.apply_to(te2, None)
        assert net2.load_weights(path) == ([], [])
        for k, v in net2.state_dict().items():
            np.testing.assert_array_equal(v, st_tensors[k].astype(np.float32))
        layers.set_init_seed(0)
        te3 = ctm.CLIPTextModel(ctm.CLIPTextConfig.tiny())
        inf, wsd = lora.create_network_from_weights(0.7, path, None, te3, None, for_inference=True)
        inf.merge_to(te3, None, wsd)
        merged[path] = {p.name: p.asnumpy() for p in te3.get_parameters()}
    for name, value in merged[st].items():
        np.testing.assert_array_equal(merged[pt][name], value)

    out = str(tmp_path / "converted.safetensors")
    convert_weights.main(["--input", pt, "--output", out])
    c_tensors, c_meta, c_dtypes = lora_file.load_state_dict_file(out)
    assert c_meta == {} and c_dtypes == st_dtypes
    for k in st_tensors:
        np.testing.assert_array_equal(c_tensors[k], st_tensors[k])


def test_convert_round_trips_are_bit_exact(te_net, tmp_path):
    _, net = te_net
    for precision in (None, "bf16"):
        src = str(tmp_path / f"src_{precision}.safetensors")
        net.save_weights(src, precision, {"ss_output_name": "x", "modelspec.title": "t é"})
        ckpt = str(tmp_path / f"mid_{precision}.ckpt")
        back = str(tmp_path / f"back_{precision}.safetensors")
        old_umask = os.umask(0o022)
        try:  # MindSpore writes .ckpt files 0400: the output gets the ordinary mode
            convert_weights.main(["--input", src, "--output", ckpt])
        finally:
            os.umask(old_umask)
        assert oct(os.stat(ckpt).st_mode & 0o777) == oct(0o644)
        convert_weights.main(["--input", ckpt, "--output", back])
        with open(src, "rb") as a, open(back, "rb") as b:
            assert a.read() == b.read()  # safetensors -> ckpt -> safetensors: same bytes
        ckpt2 = str(tmp_path / f"again_{precision}.ckpt")
        convert_weights.main(["--input", back, "--output", ckpt2])
        t1, m1, d1 = lora_file.load_state_dict_file(ckpt)
        t2, m2, d2 = lora_file.load_state_dict_file(ckpt2)
        assert m1 == m2 and d1 == d2 and list(t1) == list(t2)
        for k in t1:
            assert t1[k].dtype == t2[k].dtype
            np.testing.assert_array_equal(t1[k], t2[k])


def test_convert_tool_keys_and_cli_errors(tmp_path):
    # diffusers/PEFT key names -> kohya names (SDXL base layout)
    peft = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": np.ones((2, 2048),
                                                                                                   np.float32),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": np.ones((640, 2),
                                                                                                   np.float32),
            "text_encoder_2.text_model.encoder.layers.31.mlp.fc2.lora_A.weight": np.ones((2, 5120), np.float32),
            "text_encoder_2.text_model.encoder.layers.31.mlp.fc2.lora_B.weight": np.ones((1280, 2), np.float32)}
    src = str(tmp_path / "peft.safetensors")
    lora_file.save_state_dict_file(src, peft)
    out = str(tmp_path / "kohya.safetensors")
    convert_weights.main(["--input", src, "--output", out, "--convert_keys"])
    keys, _, _ = lora_file.load_state_dict_file(out)
    assert set(keys) == {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
                         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
                         "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_down.weight",
                         "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_up.weight"}
    # CLI: one line, exit status 2, no traceback, nothing written
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    target = str(tmp_path / "never.ckpt")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--input", str(bad),
                        "--output", target], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "bad.safetensors" in lines[0] and "corrupt safetensors header" in lines[0]
    assert not os.path.exists(target) and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]


def _expect(match, fn, *a, **kw):
    with pytest.raises(UserError, match=match) as e:
        fn(*a, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_files_give_one_clear_error(te_net, tmp_path):
    te, net = te_net
    good = str(tmp_path / "good.safetensors")
    net.save_weights(good, None, None)
    data = open(good, "rb").read()
    load = lora_file.load_state_dict_file

    _expect("file not found", load, str(tmp_path / "missing.safetensors"))
    _expect("is a folder", load, str(tmp_path))
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"abc")
    _expect("too short", load, str(p))
    p = tmp_path / "trunc.safetensors"
    p.write_bytes(data[:-40])
    _expect("truncated or corrupt", load, str(p))
    p = tmp_path / "hdr.safetensors"
    p.write_bytes(b"\xff" * 8 + data[8:])
    _expect("bad header length", load, str(p))
    p = tmp_path / "garbage.ckpt"
    p.write_bytes(os.urandom(300))
    _expect("garbage.ckpt: not a readable MindSpore checkpoint", load, str(p))
    p = tmp_path / "zip.ckpt"
    import zipfile
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.txt", "hi")
    _expect("not a torch checkpoint", load, str(p))
    _expect("unknown weights file extension", lora_file.save_state_dict_file, str(tmp_path / "x.bin2"), {})
    _expect("output folder", lora_file.save_state_dict_file, str(tmp_path / "no" / "x.safetensors"), {})

    sd, _, _ = lora_file.load_state_dict_file(good)
    name = "lora_te_text_model_encoder_layers_1_mlp_fc1"

    def variant(fname, mutate):
        d = dict(sd)
        mutate(d)
        path = str(tmp_path / fname)
        lora_file.save_state_dict_file(path, d)
        return path

    layers.set_init_seed(0)
    te_fresh = ctm.CLIPTextModel(ctm.CLIPTextConfig.tiny())
    before = {p.name: p.asnumpy().copy() for p in te_fresh.get_parameters()}
    # wrong shape, named
    path = variant("shape.safetensors", lambda d: d.__setitem__(f"{name}.lora_up.weight", np.zeros((7, 4), np.float32)))
    msg = _expect(f"{name}.lora_up.weight has shape", lora.create_network_from_weights, 1.0, path, None, te_fresh, None)
    assert "(64, 4)" in msg
    # a module the model does not have (an SD1 UNet key: no UNet here; a TE layer past the end)
    path = variant("unknown.safetensors", lambda d: d.update({
        "lora_te_text_model_encoder_layers_9_mlp_fc1.lora_down.weight": np.zeros((4, 32), np.float32),
        "lora_te_text_model_encoder_layers_9_mlp_fc1.lora_up.weight": np.zeros((64, 4), np.float32)}))
    _expect("lora_te_text_model_encoder_layers_9_mlp_fc1 does not exist in the model",
            lora.create_network_from_weights, 1.0, path, None, te_fresh, None)
    path = variant("nounet.safetensors", lambda d: d.update({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), np.float32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((64, 4), np.float32)}))
    _expect("no UNet was given", lora.create_network_from_weights, 1.0, path, None, te_fresh, None)
    path = variant("noup.safetensors", lambda d: d.pop(f"{name}.lora_up.weight"))
    _expect(f"module {name} has no lora_up.weight", lora.create_network_from_weights, 1.0, path, None, te_fresh,
            None)
    path = variant("extra.safetensors", lambda d: d.__setitem__(f"{name}.dora_scale", np.ones((1, 32), np.float32)))
    _expect("dora_scale", lora.create_network_from_weights, 1.0, path, None, te_fresh, None)
    path = variant("weird.safetensors", lambda d: d.__setitem__("model.something.weight", np.ones((2,), np.float32)))
    _expect("no known format", lora.create_network_from_weights, 1.0, path, None, te_fresh, None)

    # nothing partly merged: a network whose last module's weights do not fit
    inf, wsd = lora.create_network_from_weights(1.0, good, None, te_fresh, None, for_inference=True)
    last = inf.loras[-1].lora_name
    wsd[f"{last}.lora_down.weight"] = np.zeros((4, 3), np.float32)
    _expect(f"{last}.lora_down.weight has shape", inf.merge_to, te_fresh, None, wsd)
    for p in te_fresh.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), before[p.name])

    # atomic write: a failure while writing leaves neither the target nor a temp file
    target = str(tmp_path / "atomic.ckpt")

    def boom(*a, **k):
        raise RuntimeError("disk full")
    orig = lora_file.serialize_mindspore_ckpt
    lora_file.serialize_mindspore_ckpt = boom
    try:
        with pytest.raises(RuntimeError):
            net.save_weights(target, None, None)
    finally:
        lora_file.serialize_mindspore_ckpt = orig
    assert not os.path.exists(target) and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]


def test_all_kohya_metadata_arguments_become_modelspec_keys(tmp_path):
    """kohya's 11 ``--metadata_*`` arguments (sai_model_spec.add_model_spec_arguments), parsed by the trainer's
    parser: title/author/description/license/tags as modelspec fields, the others as modelspec.<name> extras;
    a thumbnail file becomes a data URL (kohya's file_to_data_url); a missing one stops at start."""
    import base64

    from library.device_utils import UserError
    from library.train_args import parse_args, setup_parser

    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG fake bytes")
    values = {"title": "T", "author": "A", "description": "D", "license": "L", "tags": "x,y", "usage_hint": "U",
              "thumbnail": str(thumb), "merged_from": "m1, m2", "trigger_phrase": "sks", "preprocessor": "P",
              "is_negative_embedding": "False"}
    argv = ["--output_name", "out"] + [a for k, v in values.items() for a in (f"--metadata_{k}", v)]
    args = parse_args(setup_parser(), argv)
    lora_metadata.check_metadata_args(args)
    md = lora_metadata.get_sai_model_spec(args, timestamp=1700000000.0)
    expected = {k: v for k, v in values.items() if k != "thumbnail"}
    expected["thumbnail"] = "data:image/png;base64," + base64.b64encode(thumb.read_bytes()).decode("ascii")
    for key, value in expected.items():
        assert md[f"modelspec.{key}"] == value, key
    args = parse_args(setup_parser(), ["--metadata_thumbnail", "data:image/png;base64,AAAA"])
    assert lora_metadata.get_sai_model_spec(args)["modelspec.thumbnail"] == "data:image/png;base64,AAAA"
    args = parse_args(setup_parser(), ["--metadata_thumbnail", str(tmp_path / "missing.png")])
    with pytest.raises(UserError, match="--metadata_thumbnail .*missing.png: file not found"):
        lora_metadata.check_metadata_args(args)


def test_training_metadata_names_and_hashes_the_model_and_vae_files(tmp_path):
    """kohya: a local checkpoint or VAE file is named by its base name with its two hashes; a name that is
    not a local file (a hub id) is written as given, without hashes."""
    import hashlib

    model, vae = tmp_path / "base.safetensors", tmp_path / "vae.safetensors"
    model.write_bytes(bytes(range(256)) * 5000)
    vae.write_bytes(b"vae" * 100)
    md = lora_metadata.build_training_metadata(_args(pretrained_model_name_or_path=str(model), vae=str(vae)),
                                               session_id=1, training_started_at=0.0)
    for kind, path in (("sd_model", model), ("vae", vae)):
        assert md[f"ss_{kind}_name"] == path.name
        assert md[f"ss_new_{kind}_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert md[f"ss_{kind}_hash"] == lora_metadata.model_hash(str(path))
    assert md["ss_sd_model_hash"] != md["ss_vae_hash"]
    md = lora_metadata.build_training_metadata(_args(pretrained_model_name_or_path="org/sdxl", vae="org/vae"),
                                               session_id=1, training_started_at=0.0)
    assert (md["ss_sd_model_name"], md["ss_vae_name"]) == ("org/sdxl", "org/vae")
    assert not any(k.endswith("_hash") and ("model" in k or "vae" in k) for k in md)
