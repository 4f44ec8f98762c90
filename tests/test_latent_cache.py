"""Latent and text-encoder output caches: disk equals fresh, stale files recomputed, kohya's file names."""
import os
import random

import numpy as np
import pytest

from dataset_helpers import parse_args, write_image, write_text
from library import config_util, latent_cache, train_util


@pytest.fixture(scope="module")
def encode_fn():
    import mindspore as ms
    from library.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(block_out_channels=(16, 32, 32, 32)))
    calls = []
    mean_fn = latent_cache.make_vae_encode_fn(vae, sample=False)

    def fn(images):
        calls.append(images.shape)
        return mean_fn(images)

    fn.calls = calls
    fn.vae = vae
    return fn


def _group(tmp_path, *extra):
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--enable_bucket",
                       "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32", *extra])
    random.seed(0)
    group, _ = config_util.build_dataset_groups(args)
    train_util.verify_dataset_args(args, group)
    return group


def test_disk_cache_equals_fresh_and_stale_is_recomputed(tmp_path, encode_fn):
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    d = tmp_path / "img" / "1_x"
    write_image(str(d / "a.png"), 64, 64, seed=1)
    write_image(str(d / "b.png"), 96, 64, seed=2)
    write_image(str(d / "c.png"), 64, 64, seed=3)

    mem = _group(tmp_path, "--flip_aug", "--cache_latents", "--vae_batch_size", "2")
    mem.cache_latents(encode_fn, vae_batch_size=2)
    # batches by bucket, at most vae_batch_size: (64,64) x2 [+ flipped], (96,64)->bucket x1 [+ flipped]
    assert sorted(s[0] for s in encode_fn.calls) == [1, 1, 2, 2]

    disk = _group(tmp_path, "--flip_aug", "--cache_latents_to_disk", "--vae_batch_size", "2")
    disk.cache_latents(encode_fn, vae_batch_size=2, cache_to_disk=True)
    files = sorted(f for f in os.listdir(d) if f.endswith(".npz"))
    assert files == ["a_0064x0064_sdxl.npz", "b_0096x0064_sdxl.npz", "c_0064x0064_sdxl.npz"]
    for key, info in mem.image_data.items():
        latents, original_size, crop_ltrb, flipped, alpha = latent_cache.load_latents_from_disk(
            disk.image_data[key].latents_npz)
        np.testing.assert_array_equal(latents, info.latents)
        np.testing.assert_array_equal(flipped, info.latents_flipped)
        assert original_size == list(info.latents_original_size) and alpha is None
        assert latents.shape == (4, info.bucket_reso[1] // 8, info.bucket_reso[0] // 8)
    # the flipped latents are the encoding of the mirrored image
    a = mem.image_data[str(d / "a.png")]
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(d / "a.png").convert("RGB"))
    x = ((img.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(encode_fn(np.ascontiguousarray(x[..., ::-1]))[0], a.latents_flipped, atol=1e-5)

    # batches from the disk cache carry latents (no images) and the size conditioning
    for i in range(len(disk)):
        ex = disk[i]
        assert ex["images"] is None and ex["latents"].shape[1] == 4
        assert (ex["target_sizes_hw"][0] == np.array(ex["latents"].shape[2:]) * 8).all()

    # second run: every file is valid, nothing is encoded
    n = len(encode_fn.calls)
    again = _group(tmp_path, "--flip_aug", "--cache_latents_to_disk")
    again.cache_latents(encode_fn, cache_to_disk=True)
    assert len(encode_fn.calls) == n

    # change a.png (same size): its cache is stale and recomputed; the others are kept
    before = {f: os.path.getmtime(d / f) for f in files}
    write_image(str(d / "a.png"), 64, 64, seed=99)
    stale = _group(tmp_path, "--flip_aug", "--cache_latents_to_disk")
    stale.cache_latents(encode_fn, cache_to_disk=True)
    assert len(encode_fn.calls) == n + 2  # a.png and its flip
    new = latent_cache.load_latents_from_disk(str(d / "a_0064x0064_sdxl.npz"))[0]
    assert not np.array_equal(new, mem.image_data[str(d / "a.png")].latents)
    assert os.path.getmtime(d / "b_0096x0064_sdxl.npz") == before["b_0096x0064_sdxl.npz"]

    # a cache without flipped latents is not valid for flip_aug
    assert latent_cache.is_disk_cached_latents_expected((64, 64), str(d / "c_0064x0064_sdxl.npz"), True, False)
    np.savez(str(d / "c_0064x0064_sdxl.npz"), latents=new, original_size=np.array([64, 64]),
             crop_ltrb=np.array([0, 0, 64, 64]))
    assert not latent_cache.is_disk_cached_latents_expected((64, 64), str(d / "c_0064x0064_sdxl.npz"), True, False)
    assert latent_cache.is_disk_cached_latents_expected((64, 64), str(d / "c_0064x0064_sdxl.npz"), False, False)
    assert not latent_cache.is_disk_cached_latents_expected((96, 64), str(d / "c_0064x0064_sdxl.npz"), False, False)


def test_sampled_latents_seeded(encode_fn):
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    x = np.zeros((1, 3, 32, 32), np.float32)
    a = latent_cache.make_vae_encode_fn(encode_fn.vae, sample=True, seed=5)(x)
    b = latent_cache.make_vae_encode_fn(encode_fn.vae, sample=True, seed=5)(x)
    m = latent_cache.make_vae_encode_fn(encode_fn.vae, sample=False)(x)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 4, 4, 4) and not np.array_equal(a, m)


def test_text_encoder_output_cache(tmp_path):
    from library.clip_tokenizer import load_tokenizers

    d = tmp_path / "img" / "1_x"
    write_image(str(d / "a.png"), 64, 64)
    write_image(str(d / "b.png"), 64, 64, seed=2)
    write_text(str(d / "a.caption"), "a red cat")
    calls = []

    def te_fn(ids1, ids2):  # stands in for the two text encoders
        calls.append(ids1.shape)
        b, n, _ = ids1.shape
        h1 = np.repeat(ids1.reshape(b, -1, 1).astype(np.float32), 768, axis=2)
        h2 = np.repeat(ids2.reshape(b, -1, 1).astype(np.float32), 1280, axis=2)
        return h1, h2, h2[:, 0, :]

    tokenizers = load_tokenizers()
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--train_batch_size", "2",
                       "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only"])
    random.seed(0)
    group, _ = config_util.build_dataset_groups(args, tokenizers)
    train_util.verify_dataset_args(args, group)
    group.cache_text_encoder_outputs(te_fn, tokenizers, cache_to_disk=True)
    assert calls == [(2, 1, 77)]
    assert sorted(f for f in os.listdir(d) if f.endswith("_te_outputs.npz")) == ["a_te_outputs.npz",
                                                                                  "b_te_outputs.npz"]
    ex = group[0]
    assert ex["input_ids_list"] is None
    h1, h2, pool = ex["text_encoder_outputs_list"]
    assert h1.shape == (2, 77, 768) and h2.shape == (2, 77, 1280) and pool.shape == (2, 1280)
    # the cached states are those of the unprocessed captions
    from library.token_chunking import tokenize_sdxl
    keys = ex["image_keys"]
    ids1, _ = tokenize_sdxl([group.image_data[k].caption for k in keys], tokenizers)
    np.testing.assert_array_equal(h1[:, :, 0], ids1[:, 0, :].astype(np.float32))

    group.cache_text_encoder_outputs(te_fn, tokenizers, cache_to_disk=True)
    assert len(calls) == 1  # reused
    write_text(str(d / "a.caption"), "a blue cat")  # caption changed -> a is recomputed
    random.seed(0)
    group, _ = config_util.build_dataset_groups(args, tokenizers)
    group.cache_text_encoder_outputs(te_fn, tokenizers, cache_to_disk=True)
    assert calls[1:] == [(1, 1, 77)]

    # --weighted_captions: plain files are stale, the captions go in with their token weights
    from library.prompt_weighting import tokenize_sdxl_weighted
    write_text(str(d / "a.caption"), "a (blue:1.5) cat")
    seen = []

    def weighted_fn(ids1, ids2, w1, w2):
        seen.append((ids1.shape, w1.shape))
        h1, h2, pool = te_fn(ids1, ids2)
        return h1 * w1[:, :, None], h2 * w2[:, :, None], pool

    random.seed(0)
    group, _ = config_util.build_dataset_groups(args, tokenizers)
    group.cache_text_encoder_outputs(weighted_fn, tokenizers, cache_to_disk=True, weighted=True)
    assert seen == [((2, 1, 77), (2, 77))]  # both recomputed
    ex = group[0]
    keys = ex["image_keys"]
    (ids1, _), (w1, _) = tokenize_sdxl_weighted([group.image_data[k].caption for k in keys], tokenizers)
    assert sorted(np.unique(w1).tolist()) == [1.0, 1.5]
    np.testing.assert_array_equal(ex["text_encoder_outputs_list"][0][:, :, 0], ids1[:, 0, :] * w1)
    group.cache_text_encoder_outputs(weighted_fn, tokenizers, cache_to_disk=True, weighted=True)
    assert len(seen) == 1  # the weighted files are reused by a weighted run


def test_tokenized_batches_without_cache(tmp_path):
    from library.clip_tokenizer import load_tokenizers

    write_image(str(tmp_path / "img" / "1_x" / "a.png"), 64, 64)
    args = parse_args(["--train_data_dir", tmp_path / "img", "--resolution", "64", "--max_token_length", "150"])
    group, _ = config_util.build_dataset_groups(args, load_tokenizers())
    ids1, ids2 = group[0]["input_ids_list"]
    assert ids1.shape == (1, 2, 77) and ids2.shape == (1, 2, 77) and ids1.dtype == np.int64
    assert ids1[0, 0, 0] == 49406 and ids2[0, 0, 0] == 49406


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_encoding_in_a_child_process_equals_this_process(dtype_name):
    """The trainer's latent caching on CPU encodes in a child process (vae_encode_process); its graphs are the
    ones this process compiles, so the posterior is the same to the bit, also with half-precision weights.
    A child that dies is an error that says so."""
    import mindspore as ms

    from library.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from library.vae_encode_process import EncoderProcess

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(1)
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(block_out_channels=(16, 32)))
    dtype = getattr(ms, dtype_name)
    if dtype != ms.float32:  # Linear/Conv weights (norms stay fp32), as the loader does
        for name, p in vae.parameters_and_names():
            if p.ndim > 1:
                p.set_dtype(dtype)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 48)).astype(np.float32)
    local = latent_cache.in_process_encoder(vae)(x)
    with EncoderProcess(vae) as child:
        for _ in range(2):  # the child serves batch after batch
            for a, b in zip(child(x), local):
                np.testing.assert_array_equal(a, b)
        assert child._process.is_alive()
        child._process.kill()
        child._process.join()
        with pytest.raises(RuntimeError, match="ended unexpectedly"):
            child(x)
    assert child._process is None
