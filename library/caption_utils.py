"""Captions: reading caption files and kohya's per-sample caption processing.

``process_caption`` follows kohya's ``BaseDataset.process_caption`` step by step:

1. ``caption_prefix + " " + caption + " " + caption_suffix`` (each when set);
2. dropout: the whole caption becomes "" with probability
   ``caption_dropout_rate``, or on every epoch divisible by
   ``caption_dropout_every_n_epochs``;
3. otherwise, with ``enable_wildcard`` a random line of a multi-line caption
   is taken and every ``{a|b|c}`` is replaced by one random choice (``{{`` and
   ``}}`` are literal braces); without it only the first line is kept;
4. when shuffling, tag dropout or token warm-up is on, the caption is split on
   ``caption_separator`` into tags (stripped). The fixed head is the first
   ``keep_tokens`` tags, or, when ``keep_tokens_separator`` occurs, everything
   before it (and a fixed tail after a second occurrence). Token warm-up keeps
   ``floor(step * (n - token_warmup_min) / token_warmup_step) + token_warmup_min``
   flexible tags before ``token_warmup_step`` (a value < 1 is a fraction of
   ``max_train_steps``). Then the flexible tags are shuffled, each dropped with
   ``caption_tag_dropout_rate``, and everything is joined with ", ";
5. ``secondary_separator`` is replaced by ``caption_separator``;
6. textual-inversion replacements.

Randomness comes from Python's global ``random`` (as kohya): seed it for
reproducible captions.
"""
from __future__ import annotations

import math
import os
import random
import re
from typing import Dict, Iterable, Optional

from library.device_utils import UserError


def read_caption(img_path: str, caption_extension: str, enable_wildcard: bool) -> Optional[str]:
    """Caption for a DreamBooth image: ``<stem><ext>``, or for face-crop file names
    ``a_b_..._cx_cy_w_h`` also ``<stem without the last 4 fields><ext>``; None if absent.

    Only the first line is used, unless ``enable_wildcard`` (all non-empty lines,
    joined by newlines). A file that is not UTF-8 or is empty is a UserError."""
    base = os.path.splitext(img_path)[0]
    fields = base.split("_")
    base_face = "_".join(fields[:-4]) if len(fields) >= 5 else base
    for cap_path in (base + caption_extension, base_face + caption_extension):
        if not os.path.isfile(cap_path):
            continue
        lines = read_text_lines(cap_path)
        if len(lines) == 0:
            raise UserError(f"caption file is empty: {cap_path}")
        if enable_wildcard:
            return "\n".join(line.strip() for line in lines if line.strip() != "")
        return lines[0].strip()
    return None


def read_text_lines(path: str):
    try:
        with open(path, "rt", encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError as e:
        raise UserError(f"caption file is not UTF-8 text: {path} ({e.reason} at byte {e.start})") from e


def _replace_wildcards(caption: str) -> str:
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark += "\u2985"
        close_mark += "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: random.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def effective_token_warmup_step(token_warmup_step: float, max_train_steps: int):
    """kohya: a value < 1 means that fraction of max_train_steps."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return token_warmup_step


def process_caption(subset, caption: str, current_epoch: int = 0, current_step: int = 0,
                    max_train_steps: int = 0, replacements: Optional[Dict[str, object]] = None) -> str:
    """One training-time caption for ``caption`` under ``subset``'s options (see module doc)."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix

    drop = subset.caption_dropout_rate > 0 and random.random() < subset.caption_dropout_rate
    drop = drop or (subset.caption_dropout_every_n_epochs > 0
                    and current_epoch % subset.caption_dropout_every_n_epochs == 0)
    if drop:
        return ""

    if subset.enable_wildcard:
        if "\n" in caption:
            caption = random.choice(caption.split("\n"))
        caption = _replace_wildcards(caption)
    else:
        caption = caption.split("\n")[0]

    sep = subset.caption_separator
    if subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
        fixed, flex, fixed_tail = [], [], []
        kts = subset.keep_tokens_separator
        if kts and kts in caption:
            fixed_part, flex_part = caption.split(kts, 1)
            if kts in flex_part:
                flex_part, tail_part = flex_part.split(kts, 1)
                fixed_tail = [t.strip() for t in tail_part.split(sep) if t.strip()]
            fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex = tokens[:]
            if subset.keep_tokens > 0:
                fixed = flex[:subset.keep_tokens]
                flex = tokens[subset.keep_tokens:]

        warmup = effective_token_warmup_step(subset.token_warmup_step, max_train_steps)
        if warmup and current_step < warmup:
            n = math.floor(current_step * ((len(flex) - subset.token_warmup_min) / warmup)) + subset.token_warmup_min
            flex = flex[:n]

        if subset.shuffle_caption:
            random.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if random.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_tail)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, sep)

    for str_from, str_to in (replacements or {}).items():
        if str_from == "":
            caption = random.choice(str_to) if isinstance(str_to, list) else str_to
        else:
            caption = caption.replace(str_from, str_to)
    return caption


def count_tags(frequency: Dict[str, int], captions: Iterable[str]) -> Dict[str, int]:
    """kohya's tag frequency (comma-separated, stripped, lower-cased)."""
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                frequency[tag] = frequency.get(tag, 0) + 1
    return frequency
