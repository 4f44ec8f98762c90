"""kohya's ``--tokenizer_cache_dir`` (library/clip_tokenizer.load_tokenizers(cache_dir)).

kohya (library/sdxl_train_util.load_tokenizers) reads each tokenizer from
``<dir>/openai_clip-vit-large-patch14`` and ``<dir>/laion_CLIP-ViT-bigG-14-laion2B-39B-b160k`` with
``CLIPTokenizer.from_pretrained`` when the folder exists, else downloads it and ``save_pretrained``s it
there; tokenizer 2 gets ``pad_token_id = 0``. The reference here is transformers' CLIPTokenizer doing
exactly that on folders it wrote itself with ``save_pretrained`` (built from our bundled vocabulary, as
nothing can be downloaded), run in a subprocess without torch.
"""
import json
import os
import subprocess
import sys

import pytest

from library.clip_tokenizer import (EOS_TOKEN, TOKENIZER_CACHE_SUBDIRS, load_tokenizer1, load_tokenizer2,
                                    load_tokenizers, write_hf_tokenizer_files)
from library.device_utils import UserError

PROMPTS = ["a photo of a cat", "A Dog and a CAT, wow!! <|endoftext|> naïve café",
           "hello!world 1girl, (masterpiece:1.2)", "a cat " * 40]

# kohya's load_tokenizers with the transformers tokenizer: save_pretrained when the folder is missing, then
# from_pretrained of the cache folder; ids for each prompt as kohya tokenizes (max_length, truncation).
_HF_SCRIPT = r"""
import json, os, sys
from transformers import CLIPTokenizer

args = json.load(open(sys.argv[1], encoding="utf-8"))
out = {}
for name, cache in args["caches"].items():
    if args["save"]:
        for src, sub in zip(args["sources"], args["subdirs"]):
            CLIPTokenizer.from_pretrained(src).save_pretrained(os.path.join(cache, sub))
    ids = []
    for i, sub in enumerate(args["subdirs"]):
        tok = CLIPTokenizer.from_pretrained(os.path.join(cache, sub))
        if i == 1:
            tok.pad_token_id = 0
        ids.append([tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in args["prompts"]])
    out[name] = ids
json.dump(out, open(sys.argv[2], "w", encoding="utf-8"))
"""


def _transformers(tmp, caches, save=False, sources=None):
    (tmp / "args.json").write_text(json.dumps({"caches": caches, "save": save, "sources": sources or [],
                                               "subdirs": TOKENIZER_CACHE_SUBDIRS, "prompts": PROMPTS}),
                                   encoding="utf-8")
    (tmp / "ref.py").write_text(_HF_SCRIPT, encoding="utf-8")
    env = dict(os.environ, USE_TORCH="0", USE_TF="0", USE_FLAX="0", TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(tmp / "ref.py"), str(tmp / "args.json"), str(tmp / "out.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"transformers reference failed:\n{proc.stderr[-2000:]}")
    return json.loads((tmp / "out.json").read_text(encoding="utf-8"))


def _ids(tokenizers):
    return [[tok(p, padding="max_length", max_length=77, truncation=True)["input_ids"] for p in PROMPTS]
            for tok in tokenizers]


def _swap_ids(vocab_path, a, b):
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    return vocab


@pytest.fixture(scope="module")
def kohya_caches(tmp_path_factory):
    """Two cache folders written by transformers' save_pretrained (the standard vocabulary, and the same with
    "cat</w>" and "dog</w>" swapped in both vocab.json files), and transformers' ids from each."""
    tmp = tmp_path_factory.mktemp("kohya_cache")
    sources = [str(tmp / "src1"), str(tmp / "src2")]
    write_hf_tokenizer_files(sources[0], pad_token=EOS_TOKEN)
    write_hf_tokenizer_files(sources[1], pad_token="!")
    caches = {"standard": str(tmp / "standard"), "modified": str(tmp / "modified")}
    _transformers(tmp, caches, save=True, sources=sources)
    for sub in TOKENIZER_CACHE_SUBDIRS:
        vocab = _swap_ids(os.path.join(caches["modified"], sub, "vocab.json"), "cat</w>", "dog</w>")
    ref = _transformers(tmp, caches)  # from the files as they are now
    return caches, ref, vocab


def test_reads_kohyas_cache_folders_as_transformers(kohya_caches, caplog):
    caches, ref, _ = kohya_caches
    for sub in TOKENIZER_CACHE_SUBDIRS:  # transformers' save_pretrained layout
        assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= set(
            os.listdir(os.path.join(caches["standard"], sub)))
    with caplog.at_level("INFO"):
        tokenizers = load_tokenizers(caches["standard"])
    assert [m for m in caplog.messages if m.startswith("load tokenizer from cache")] == [
        f"load tokenizer from cache: {os.path.join(caches['standard'], sub)}" for sub in TOKENIZER_CACHE_SUBDIRS]
    assert tokenizers[0].pad_token_id == 49407 and tokenizers[1].pad_token_id == 0
    ours = _ids(tokenizers)
    assert ours == ref["standard"]
    assert ours == _ids([load_tokenizer1(), load_tokenizer2()])  # the same vocabulary as the bundled one
    assert ours[1][1][8:10] == [0, 0]  # tokenizer 2: "!!" -> two pad tokens (id 0), as transformers


def test_a_modified_vocabulary_in_the_cache_is_used(kohya_caches):
    caches, ref, vocab = kohya_caches
    ours = _ids(load_tokenizers(caches["modified"]))
    assert ours == ref["modified"]
    assert ours != ref["standard"]
    assert ours[0][0][:7] == [49406, 320, 1125, 539, 320, vocab["cat</w>"], 49407] and vocab["cat</w>"] == 1929


def test_missing_cache_gets_the_bundled_tokenizers_in_kohyas_layout(tmp_path, caplog):
    cache = tmp_path / "new" / "cache"  # parents created, as save_pretrained does
    old_umask = os.umask(0o022)
    try:
        with caplog.at_level("INFO"):
            tokenizers = load_tokenizers(str(cache))
    finally:
        os.umask(old_umask)
    assert sum(m.startswith("save Tokenizer to cache") for m in caplog.messages) == 2
    assert sorted(os.listdir(cache)) == sorted(TOKENIZER_CACHE_SUBDIRS)  # no temporary folder left
    for sub, pad in zip(TOKENIZER_CACHE_SUBDIRS, (EOS_TOKEN, "!")):
        folder = cache / sub
        assert sorted(os.listdir(folder)) == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                                              "vocab.json"]
        assert json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))["pad_token"] == pad
        assert all(oct(os.stat(folder / f).st_mode & 0o777) == oct(0o644) for f in os.listdir(folder))
    assert _ids(tokenizers) == _ids([load_tokenizer1(), load_tokenizer2()])
    # a later run -- kohya's (transformers from_pretrained) or ours -- reads them
    caplog.clear()
    with caplog.at_level("INFO"):
        again = load_tokenizers(str(cache))
    assert sum(m.startswith("load tokenizer from cache") for m in caplog.messages) == 2
    assert _ids(again) == _ids(tokenizers)
    ref = _transformers(tmp_path, {"ours": str(cache)})
    assert ref["ours"] == _ids(tokenizers)


def _expect(match, cache):
    with pytest.raises(UserError, match=match) as e:
        load_tokenizers(str(cache))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_cache_folders_give_one_line_naming_the_file(tmp_path):
    good = tmp_path / "good"
    load_tokenizers(str(good))
    sub1, sub2 = (good / s for s in TOKENIZER_CACHE_SUBDIRS)

    f = tmp_path / "a_file"
    f.write_text("x")
    assert str(f) in _expect("is a file, not a folder", f)

    def broken(name, mutate):
        cache = tmp_path / name
        os.makedirs(cache)
        for s in TOKENIZER_CACHE_SUBDIRS:
            os.makedirs(cache / s)
            for n in os.listdir(good / s):
                (cache / s / n).write_bytes((good / s / n).read_bytes())
        mutate(cache / TOKENIZER_CACHE_SUBDIRS[0], cache / TOKENIZER_CACHE_SUBDIRS[1])
        return cache

    c = broken("no_vocab", lambda a, b: os.remove(a / "vocab.json"))
    assert str(c / TOKENIZER_CACHE_SUBDIRS[0] / "vocab.json") in _expect("missing", c)
    c = broken("no_merges", lambda a, b: os.remove(b / "merges.txt"))
    assert str(c / TOKENIZER_CACHE_SUBDIRS[1] / "merges.txt") in _expect("missing", c)
    c = broken("sub_is_file", lambda a, b: (os.remove(b / "vocab.json"), os.remove(b / "merges.txt"),
                                            os.remove(b / "tokenizer_config.json"),
                                            os.remove(b / "special_tokens_map.json"), os.rmdir(b),
                                            b.write_text("x")))
    assert str(c / TOKENIZER_CACHE_SUBDIRS[1]) in _expect("is a file, not a tokenizer folder", c)
    c = broken("corrupt_vocab", lambda a, b: (a / "vocab.json").write_text('{"a": 1,', encoding="utf-8"))
    assert str(c / TOKENIZER_CACHE_SUBDIRS[0] / "vocab.json") in _expect("not a readable tokenizer vocabulary", c)
    c = broken("list_vocab", lambda a, b: (a / "vocab.json").write_text('["a"]', encoding="utf-8"))
    _expect("vocab.json: not a tokenizer vocabulary", c)
    c = broken("no_eos", lambda a, b: (a / "vocab.json").write_text('{"a": 1, "<|startoftext|>": 2}',
                                                                  encoding="utf-8"))
    _expect("vocab.json: the vocabulary has no <|endoftext|>", c)
    c = broken("bad_merges", lambda a, b: (b / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n",
                                                                       encoding="utf-8"))
    assert str(c / TOKENIZER_CACHE_SUBDIRS[1] / "merges.txt") in _expect("line 3 is 't h e'", c)
    c = broken("binary_merges", lambda a, b: (b / "merges.txt").write_bytes(b"#v\n\xff\xfe x\n"))
    _expect("merges.txt: not a readable merges file", c)
    c = broken("bang_not_0", lambda a, b: _swap_ids(str(b / "vocab.json"), "!", "\""))
    _expect(r"vocab.json: '!' has id 1, expected 0", c)
    assert str(f / "cache") in _expect("cannot write the tokenizer cache", f / "cache")  # below a file
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "read_only"
        os.makedirs(ro)
        os.chmod(ro, 0o555)
        try:
            _expect("cannot write the tokenizer cache", ro / "cache")
        finally:
            os.chmod(ro, 0o755)
    assert sub1.is_dir() and sub2.is_dir()


def test_trainer_reads_the_cache_before_the_checkpoint(tmp_path, monkeypatch):
    """Through train() as the CLI calls it: a bad --tokenizer_cache_dir stops before the checkpoint load with
    one line naming it; a missing one is filled before the run goes on (here to its dataset check)."""
    import sdxl_train_network
    from library import train_args

    parser = sdxl_train_network.setup_parser()
    base = ["--pretrained_model_name_or_path", str(tmp_path / "no_such_model.safetensors"),
            "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora"]

    def no_load(args):
        raise AssertionError("the checkpoint load was reached")

    bad = tmp_path / "cache_file"
    bad.write_text("x")
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    monkeypatch.setattr(trainer, "load_target_model", no_load)
    with pytest.raises(UserError) as e:
        trainer.train(train_args.parse_args(parser, base + ["--tokenizer_cache_dir", str(bad)]), parser)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)

    cache = tmp_path / "cache"
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    monkeypatch.setattr(trainer, "load_target_model", no_load)
    with pytest.raises(UserError) as e:  # no dataset given: the run stops there, after the tokenizers
        trainer.train(train_args.parse_args(parser, base + ["--tokenizer_cache_dir", str(cache)]), parser)
    assert "no training data" in str(e.value), str(e.value)
    assert sorted(os.listdir(cache)) == sorted(TOKENIZER_CACHE_SUBDIRS)
    assert [t.pad_token_id for t in trainer.tokenizers] == [49407, 0]
