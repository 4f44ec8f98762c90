"""Offline CLIP tokenizer (library/clip_tokenizer.py) and kohya's
max_token_length chunking (library/token_chunking.py).

References: transformers' CLIPTokenizer loaded from the vocab.json /
merges.txt our helper writes (pad token as each SDXL tokenizer), and the
committed ids it produced (tests/data/clip_tokenizer_golden.json, made by
tests/data/make_clip_tokenizer_golden.py), so the comparison also runs where
transformers cannot be imported. Chunking is checked against kohya's
get_input_ids algorithm restated below and against hand-worked cases.
"""
import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from library.clip_tokenizer import (
    BOS_TOKEN,
    BPE_VOCAB_PATH,
    EOS_TOKEN,
    CLIPTokenizer,
    bytes_to_unicode,
    load_bpe_vocab,
    load_tokenizer1,
    load_tokenizer2,
    load_tokenizers,
    write_hf_tokenizer_files,
)
from library.token_chunking import check_max_token_length, get_input_ids, tokenize_sdxl

BOS, EOS, PAD2 = 49406, 49407, 0
GOLDEN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "clip_tokenizer_golden.json")

_LONG_TAGS = ", ".join(
    f"tag{i} {w}" for i, w in enumerate(
        "red blue green castle forest river mountain sunset portrait detailed eyes "
        "soft lighting cinematic bokeh film grain watercolor sketch night city rain".split()
    )
)
CAPTIONS = [
    "a photo of a cat",
    "A Photo Of A CAT, high quality.",
    "(masterpiece:1.2), [bad], 1girl, <lora:x:0.5>",
    "((best quality)), (ugly:0.8), {{old}}, solo, looking at viewer, BREAK hat",
    "don't stop, it's John's dog; we'll see, I'd've THEY'RE YOU'VE i'm",
    "multiple   spaces\n\nand\ttabs \r\n end  ",
    "",
    "   \n ",
    "Café naïve résumé Ångström Straße",
    "日本語のキャプション、猫と犬。한국어 中文",
    "emoji 🐱🔥👍🏽 flags 🇯🇵 family 👨‍👩‍👧",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;x&#39; &nbsp;",
    "<b>bold</b> &amp; entities next to a tag",
    "numbers 1234567890 3.14 1e-5 50% $100 2nd 1girl 10,000",
    "wow!! great! !!! hello!world",
    "punctuation: ... --- ;;; ??? !?! @#$%^&*()_+={}[]|\\/~` \"q\" 'single'",
    "weird <|endoftext|> inside <|startoftext|> and <|ENDOFTEXT|>",
    "mojibake: cafÃ© â€œquotedâ€\x9d",
    "\ufb01ne ligature, full-width \uff21\uff22\uff23\uff11\uff12\uff13\uff01",
    "soft\u00adhyphen zero\u200bwidth nbsp\u00a0space",
    _LONG_TAGS,  # > 77 tokens: truncation at 77
    " ".join([_LONG_TAGS] * 3),  # > 227 tokens: truncation at 152 and 227
    "a " * 75,  # exactly 75 text tokens
    "a " * 150,  # exactly 150 text tokens
]


# --------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizers()


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN_PATH, encoding="utf-8") as f:
        data = json.load(f)
    assert data["captions"] == CAPTIONS, "captions changed: rerun tests/data/make_clip_tokenizer_golden.py"
    return data


_HF_SCRIPT = r"""
import json, sys
from transformers import CLIPTokenizer

args = json.load(open(sys.argv[1], encoding="utf-8"))
captions = args["captions"]
out = {}
for name, d, pad in args["tokenizers"]:
    tok = CLIPTokenizer(d + "/vocab.json", d + "/merges.txt", pad_token=pad)
    full = [tok(c).input_ids for c in captions]
    batch = tok(captions[:6], padding=True)
    out[name] = {
        "pad_token_id": tok.pad_token_id,
        "tokenize": [tok.tokenize(c) for c in captions],
        "full": full,
        "padded": {str(n): [tok(c, padding="max_length", max_length=n, truncation=True).input_ids for c in captions]
                   for n in (77, 152, 227)},
        "decode": [tok.decode(ids) for ids in full],
        "decode_skip": [tok.decode(ids, skip_special_tokens=True) for ids in full],
        "batch": [batch.input_ids, batch.attention_mask],
    }
    pre = CLIPTokenizer.from_pretrained(d)
    out[name]["from_pretrained"] = [pre.pad_token_id, pre.model_max_length, [pre(c).input_ids for c in captions]]
json.dump(out, open(sys.argv[2], "w", encoding="utf-8"))
"""


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """transformers' CLIPTokenizer (x2: pad eos / pad "!") on the vocab.json +
    merges.txt written from our gz, run once in a subprocess with
    USE_TORCH=0: importing transformers there skips torch (~4x faster) and
    leaves this process's transformers state alone. transformers is a test
    requirement: failing to import it fails the tests."""
    d = tmp_path_factory.mktemp("hf_clip")
    tokenizers = []
    for name, pad in (("tokenizer1", EOS_TOKEN), ("tokenizer2", "!")):
        write_hf_tokenizer_files(str(d / name), pad_token=pad)
        tokenizers.append([name, str(d / name), pad])
    (d / "args.json").write_text(json.dumps({"captions": CAPTIONS, "tokenizers": tokenizers}), encoding="utf-8")
    (d / "ref.py").write_text(_HF_SCRIPT, encoding="utf-8")
    env = dict(os.environ, USE_TORCH="0", USE_TF="0", USE_FLAX="0", TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(d / "ref.py"), str(d / "args.json"), str(d / "out.json")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise AssertionError(f"transformers reference failed:\n{proc.stderr[-2000:]}")
    return json.loads((d / "out.json").read_text(encoding="utf-8"))


def kohya_get_input_ids(padded_ids, model_max_length, pad_token_id, eos_token_id):
    """kohya's get_input_ids after the tokenizer call, restated on lists:
    padded_ids has tokenizer_max_length (= max_token_length + 2) entries."""
    total = len(padded_ids)
    if total <= model_max_length:
        return [list(padded_ids)]
    chunks = []
    for i in range(1, total - model_max_length + 2, model_max_length - 2):
        chunk = [padded_ids[0]] + list(padded_ids[i : i + model_max_length - 2]) + [padded_ids[-1]]
        if pad_token_id != eos_token_id:
            if chunk[-2] != eos_token_id and chunk[-2] != pad_token_id:
                chunk[-1] = eos_token_id
            if chunk[1] == pad_token_id:
                chunk[1] = eos_token_id
        chunks.append(chunk)
    return chunks


def padded_from_full(full_ids, length, pad_id):
    """transformers' truncation=True + padding="max_length" on a full
    (bos ... eos) id list: keep length - 2 text ids, add bos/eos, pad."""
    text = full_ids[1:-1][: length - 2]
    ids = [full_ids[0]] + text + [full_ids[-1]]
    return ids + [pad_id] * (length - len(ids))


# --------------------------------------------------------------- vocabulary
def test_vocabulary_file_and_tables():
    with open(BPE_VOCAB_PATH, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120" and table[0] == "\u0100"
    merges, encoder = load_bpe_vocab()
    assert len(merges) == 48894 and len(encoder) == 49408
    assert merges[0] == ("i", "n") and merges[1] == ("t", "h")
    assert encoder["!"] == 0 and encoder["!</w>"] == 256
    assert encoder[BOS_TOKEN] == BOS and encoder[EOS_TOKEN] == EOS


def test_hf_files_written(tmp_path):
    files = write_hf_tokenizer_files(str(tmp_path), pad_token="!")
    merges, encoder = load_bpe_vocab()
    with open(files["vocab.json"], encoding="utf-8") as f:
        assert json.load(f) == encoder
    with open(files["merges.txt"], encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    assert [tuple(l.split(" ")) for l in lines[1:-1]] == list(merges)
    # same merges, same order as the gz (whose header line differs)
    with gzip.open(BPE_VOCAB_PATH, "rt", encoding="utf-8") as f:
        gz_lines = f.read().split("\n")[1 : 1 + 48894]
    assert lines[1:-1] == gz_lines
    with open(files["special_tokens_map.json"], encoding="utf-8") as f:
        assert json.load(f)["pad_token"] == "!"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp_")]


# ---------------------------------------------------------------- known ids
def test_known_ids(tokenizers):
    tok1, tok2 = tokenizers
    expected = [BOS, 320, 1125, 539, 320, 2368, EOS]
    for tok, pad in ((tok1, EOS), (tok2, PAD2)):
        assert tok("a photo of a cat").input_ids == expected
        assert tok.encode("a photo of a cat") == expected
        padded = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
        assert padded == expected + [pad] * 70
        assert tok.model_max_length == 77 and tok.bos_token_id == BOS and tok.eos_token_id == EOS
    assert tok1.pad_token_id == EOS and tok2.pad_token_id == PAD2
    # "!" is tokenizer 2's pad token, hence a special token (never merged)
    assert tok1("wow!!").input_ids == [BOS, 2781, 748, EOS]
    assert tok2("wow!!").input_ids == [BOS, 2781, PAD2, PAD2, EOS]


def test_known_ids_transformers(hf_reference):
    i = CAPTIONS.index("a photo of a cat")
    assert hf_reference["tokenizer1"]["full"][i] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert hf_reference["tokenizer1"]["pad_token_id"] == EOS
    assert hf_reference["tokenizer2"]["pad_token_id"] == PAD2
    i = CAPTIONS.index("wow!! great! !!! hello!world")
    assert hf_reference["tokenizer2"]["full"][i][:5] == [BOS, 2781, PAD2, PAD2, 830]


@pytest.mark.parametrize("name", ["tokenizer1", "tokenizer2"])
def test_transformers_from_pretrained(hf_reference, name):
    """The written directory loads with from_pretrained: pad token, length, ids."""
    pad_id, max_len, ids = hf_reference[name]["from_pretrained"]
    assert pad_id == (EOS if name == "tokenizer1" else PAD2) and max_len == 77
    assert ids == hf_reference[name]["full"]


# ------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("index", [0, 1])
def test_matches_transformers(tokenizers, hf_reference, index):
    ours, ref = tokenizers[index], hf_reference[f"tokenizer{index + 1}"]
    for k, caption in enumerate(CAPTIONS):
        assert ours.tokenize(caption) == ref["tokenize"][k], caption
        assert ours(caption).input_ids == ref["full"][k], caption
        for length in (77, 152, 227):
            got = ours(caption, padding="max_length", max_length=length, truncation=True).input_ids
            assert got == ref["padded"][str(length)][k], (caption, length)
        assert ours.decode(ref["full"][k]) == ref["decode"][k], caption
        assert ours.decode(ref["full"][k], skip_special_tokens=True) == ref["decode_skip"][k], caption
    batch = ours(CAPTIONS[:6], padding=True)
    assert [batch.input_ids, batch.attention_mask] == ref["batch"]


@pytest.mark.parametrize("index", [0, 1])
def test_matches_golden(tokenizers, golden, index):
    tok = tokenizers[index]
    ref = golden[f"tokenizer{index + 1}"]
    for caption, full, max77 in zip(CAPTIONS, ref["full"], ref["max77"]):
        assert tok(caption).input_ids == full, caption
        assert tok(caption, padding="max_length", max_length=77, truncation=True).input_ids == max77, caption


def test_golden_is_current(golden, hf_reference):
    for name in ("tokenizer1", "tokenizer2"):
        assert hf_reference[name]["full"] == golden[name]["full"]
        assert hf_reference[name]["padded"]["77"] == golden[name]["max77"]


def test_call_options(tokenizers):
    tok1, tok2 = tokenizers
    long_caption = CAPTIONS[-3]
    enc = tok1(long_caption, truncation=True)  # max_length defaults to model_max_length
    assert len(enc.input_ids) == 77 and enc.input_ids[-1] == EOS
    assert len(tok1(long_caption).input_ids) > 77  # no truncation asked
    arr = tok2(["a cat", "a photo of a dog"], padding="max_length", max_length=10, return_tensors="np")
    assert arr["input_ids"].shape == (2, 10) and arr["input_ids"].dtype == np.int64
    assert arr.input_ids[0].tolist() == [BOS, 320, 2368, EOS] + [PAD2] * 6
    assert arr.attention_mask[0].tolist() == [1] * 4 + [0] * 6
    assert tok2("").input_ids == [BOS, EOS]
    with pytest.raises(ValueError):
        tok1(["a", "a b c"], return_tensors="np")
    with pytest.raises(ValueError):
        tok1("a", return_tensors="pt")
    with pytest.raises(ValueError):
        CLIPTokenizer(pad_token="<pad>")
    assert load_tokenizer1() is tok1 and load_tokenizer2() is tok2
    assert tok1.decode(tok1.encode("A Cat, sitting!"), skip_special_tokens=True) == "a cat , sitting !"


# ------------------------------------------------------------------ chunking
@pytest.mark.parametrize("max_token_length", [None, 150, 225])
@pytest.mark.parametrize("index", [0, 1])
def test_chunking_follows_kohya(tokenizers, golden, max_token_length, index):
    tok = tokenizers[index]
    total = 77 if max_token_length is None else max_token_length + 2
    n_chunks = 1 if max_token_length is None else max_token_length // 75
    full_ref = golden[f"tokenizer{index + 1}"]["full"]
    for caption, full in zip(CAPTIONS, full_ref):
        got = get_input_ids(caption, tok, max_token_length)
        assert got.shape == (n_chunks, 77) and got.dtype == np.int64
        padded = padded_from_full(full, total, tok.pad_token_id)
        expected = kohya_get_input_ids(padded, 77, tok.pad_token_id, tok.eos_token_id)
        assert got.tolist() == expected, (caption, max_token_length)
        for chunk in got:  # every chunk: bos first, an eos somewhere
            assert chunk[0] == BOS and EOS in chunk[1:]


@pytest.mark.parametrize("max_token_length", [150, 225])
@pytest.mark.parametrize("index", [0, 1])
def test_chunking_transformers_ids(hf_reference, tokenizers, max_token_length, index):
    """kohya's algorithm applied to transformers' own padded ids."""
    ours, ref = tokenizers[index], hf_reference[f"tokenizer{index + 1}"]
    for k, caption in enumerate(CAPTIONS):
        padded = ref["padded"][str(max_token_length + 2)][k]
        expected = kohya_get_input_ids(padded, 77, ref["pad_token_id"], EOS)
        assert get_input_ids(caption, ours, max_token_length).tolist() == expected, caption


def test_chunking_hand_checked(tokenizers):
    tok1, tok2 = tokenizers
    A = 320  # "a</w>"
    cat = [BOS, 320, 1125, 539, 320, 2368, EOS]

    # short caption, 225: chunk 1 holds the text, chunks 2-3 are empty
    got1 = get_input_ids("a photo of a cat", tok1, 225)
    assert got1.tolist() == [cat + [EOS] * 70, [BOS] + [EOS] * 76, [BOS] + [EOS] * 76]
    got2 = get_input_ids("a photo of a cat", tok2, 225)
    assert got2.tolist() == [cat + [PAD2] * 70, [BOS, EOS] + [PAD2] * 75, [BOS, EOS] + [PAD2] * 75]

    # 100 tokens, 150: the first window is full, the second holds the rest
    got1 = get_input_ids("a " * 100, tok1, 150)
    assert got1.tolist() == [[BOS] + [A] * 75 + [EOS], [BOS] + [A] * 25 + [EOS] * 51]
    got2 = get_input_ids("a " * 100, tok2, 150)
    # window 1 ends on a real token: its last id (pad) becomes eos
    assert got2.tolist() == [[BOS] + [A] * 75 + [EOS], [BOS] + [A] * 25 + [EOS] + [PAD2] * 50]

    # exactly 75 tokens, 150: window 2 starts with the caption's eos
    got2 = get_input_ids("a " * 75, tok2, 150)
    assert got2.tolist() == [[BOS] + [A] * 75 + [EOS], [BOS, EOS] + [PAD2] * 75]
    # exactly 150 tokens, 150: both windows full, last id is the caption's eos
    got2 = get_input_ids("a " * 150, tok2, 150)
    assert got2.tolist() == [[BOS] + [A] * 75 + [EOS]] * 2
    # 200 tokens, 150: truncated to 150
    got1 = get_input_ids("a " * 200, tok1, 150)
    assert got1.tolist() == [[BOS] + [A] * 75 + [EOS]] * 2

    # default (None): one 77-id row
    assert get_input_ids("a photo of a cat", tok2).tolist() == [cat + [PAD2] * 70]


def test_tokenize_sdxl_shapes(tokenizers):
    ids1, ids2 = tokenize_sdxl(["a cat", "a dog"], tokenizers, 225)
    assert ids1.shape == (2, 3, 77) and ids2.shape == (2, 3, 77)
    assert ids1[1].tolist() == get_input_ids("a dog", tokenizers[0], 225).tolist()
    assert ids2[0].tolist() == get_input_ids("a cat", tokenizers[1], 225).tolist()
    ids1, ids2 = tokenize_sdxl("a cat", tokenizers)
    assert ids1.shape == (1, 1, 77) and ids2.shape == (1, 1, 77)


@pytest.mark.parametrize("bad", [75, 76, 100, 151, 300, 0, -1, "150", 150.0, True])
def test_rejects_other_max_token_length(tokenizers, bad):
    with pytest.raises(ValueError, match="max_token_length"):
        check_max_token_length(bad)
    with pytest.raises(ValueError, match="None .*150 or 225"):
        get_input_ids("a cat", tokenizers[0], bad)
