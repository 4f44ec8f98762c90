"""Caption processing: each option against a hand-worked expectation; deterministic under a seed."""
import random

import pytest

from library.caption_utils import process_caption
from library.dataset_subsets import BaseSubset


def sub(**kw):
    return BaseSubset(**kw)


def run(caption, seed=0, epoch=0, step=0, max_steps=0, **kw):
    random.seed(seed)
    return process_caption(sub(**kw), caption, epoch, step, max_steps)


def test_plain_first_line_only():
    assert run("a, b\nsecond line") == "a, b"


def test_prefix_suffix():
    assert run("a, b", caption_prefix="P", caption_suffix="S") == "P a, b S"


def test_caption_dropout():
    assert run("a, b", caption_dropout_rate=1.0) == ""
    assert run("a, b", caption_dropout_every_n_epochs=2, epoch=4) == ""
    assert run("a, b", caption_dropout_every_n_epochs=2, epoch=3) == "a, b"


def test_shuffle_keep_tokens_matches_seeded_shuffle():
    got = run("a, b, c, d, e", seed=7, shuffle_caption=True, keep_tokens=2)
    random.seed(7)
    flex = ["c", "d", "e"]
    random.shuffle(flex)
    assert got == ", ".join(["a", "b"] + flex)
    assert got == run("a, b, c, d, e", seed=7, shuffle_caption=True, keep_tokens=2)  # deterministic
    assert got.startswith("a, b, ")


def test_keep_tokens_separator_fixed_head_and_tail():
    # all flexible tags dropped: only the fixed head and the fixed tail remain
    assert run("x, y ||| b, c ||| z", keep_tokens_separator="|||", caption_tag_dropout_rate=1.0) == "x, y, z"
    random.seed(3)
    flex = ["b", "c", "d"]
    random.shuffle(flex)
    assert run("x ||| b, c, d ||| z", seed=3, keep_tokens_separator="|||", shuffle_caption=True) == \
        ", ".join(["x"] + flex + ["z"])


def test_tag_dropout_seeded():
    tags = ["t%d" % i for i in range(10)]
    random.seed(11)
    kept = [t for t in tags if random.random() >= 0.5]
    assert run(", ".join(tags), seed=11, caption_tag_dropout_rate=0.5) == ", ".join(kept)


def test_caption_separator_and_secondary_separator():
    # warm-up to 2 tags with ';' separated captions; tags are joined with ", " as kohya
    assert run("a; b; c", caption_separator=";", token_warmup_step=10, token_warmup_min=2, step=0) == "a, b"
    # secondary separator becomes the caption separator after processing
    assert run("black;;;white hair, red eyes", secondary_separator=";;;") == "black,white hair, red eyes"
    assert run("black;;;white, red", secondary_separator=";;;", caption_tag_dropout_rate=0.0,
               shuffle_caption=True, seed=0).count(";;;") == 0


def test_wildcards():
    random.seed(5)
    first = random.choice(["red", "blue", "green"])
    assert run("{red|blue|green} cat", seed=5, enable_wildcard=True) == f"{first} cat"
    assert run("{{literal}} {a|a}", enable_wildcard=True) == "{literal} a"
    random.seed(2)
    line = random.choice(["one", "two", "three"])
    assert run("one\ntwo\nthree", seed=2, enable_wildcard=True) == line
    assert run("{red|blue} cat") == "{red|blue} cat"  # wildcards off: untouched


@pytest.mark.parametrize("step,expected", [(0, "a"), (1, "a, b"), (2, "a, b, c"), (3, "a, b, c, d"),
                                           (4, "a, b, c, d, e"), (9, "a, b, c, d, e")])
def test_token_warmup(step, expected):
    # n = floor(step * (5 - 1) / 4) + 1 before step 4
    assert run("a, b, c, d, e", token_warmup_step=4, token_warmup_min=1, step=step) == expected


def test_token_warmup_fraction_of_max_steps():
    # 0.5 of 8 steps = 4 steps
    assert run("a, b, c, d, e", token_warmup_step=0.5, token_warmup_min=1, step=2, max_steps=8) == "a, b, c"
