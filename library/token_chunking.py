"""kohya's ``--max_token_length``: captions longer than CLIP's 75 tokens.

With ``max_token_length`` 150 or 225 a caption is tokenised to
``max_token_length + 2`` ids (bos, up to 150/225 text tokens, eos, padding)
and cut into 2 or 3 windows of 75 tokens; each window gets the caption's
first id (bos) in front and the caption's last id behind, giving an array of
shape (n_chunks, 77). The text encoders run on each chunk and kohya joins the
hidden states back (see ``get_hidden_states_sdxl``).

Matching kohya's ``BaseDataset.get_input_ids`` / ``TokenizeStrategy._get_input_ids``:

* tokenizer whose pad token is eos (SDXL tokenizer 1): the chunks are used
  as they are (the caption's last id is eos or, if the caption filled all
  the room, eos anyway);
* tokenizer with another pad token (SDXL tokenizer 2, pad "!" = 0): a chunk
  whose last text position holds a real token (neither eos nor pad) gets eos
  as its final id, and a chunk that starts with a pad right after bos gets
  eos in that place, so every chunk carries an eos.

``max_token_length=None`` (kohya's default, 75 tokens) gives shape (1, 77).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

ALLOWED_MAX_TOKEN_LENGTHS = (None, 150, 225)


def check_max_token_length(max_token_length: Optional[int]) -> None:
    """Raise ValueError unless max_token_length is None (75), 150 or 225, as
    kohya's ``--max_token_length`` choices."""
    if max_token_length is None:
        return
    if isinstance(max_token_length, bool) or not isinstance(max_token_length, (int, np.integer)) or int(
        max_token_length
    ) not in (150, 225):
        raise ValueError(
            f"max_token_length={max_token_length!r} is not supported: use None (the default, 75 tokens), 150 or 225"
        )


def tokenizer_max_length(tokenizer, max_token_length: Optional[int]) -> int:
    """Ids per caption before chunking: 77 for None, else max_token_length + 2
    (kohya's ``tokenizer_max_length``)."""
    check_max_token_length(max_token_length)
    if max_token_length is None:
        return tokenizer.model_max_length
    return int(max_token_length) + 2


def get_input_ids(caption: str, tokenizer, max_token_length: Optional[int] = None) -> np.ndarray:
    """One caption -> int64 array (n_chunks, model_max_length): (1, 77) for
    None, (2, 77) for 150, (3, 77) for 225."""
    total = tokenizer_max_length(tokenizer, max_token_length)
    ids = np.asarray(
        tokenizer(caption, padding="max_length", truncation=True, max_length=total, return_tensors="np")["input_ids"],
        dtype=np.int64,
    )
    return chunk_input_ids(ids, tokenizer)


def chunk_input_ids(ids, tokenizer) -> np.ndarray:
    """One caption's padded ids (``tokenizer_max_length`` of them: bos, text, eos, padding) -> the
    (n_chunks, 77) windows described above (used by ``--weighted_captions`` too, whose ids are built
    piece by piece)."""
    ids = np.asarray(ids, dtype=np.int64)
    total = ids.size
    width = tokenizer.model_max_length
    if total <= width:
        return ids.reshape(1, width)

    ids = ids.reshape(-1)
    window = width - 2
    bos, last = ids[0], ids[-1]
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, total - width + 2, window):
        chunk = np.concatenate([[bos], ids[start : start + window], [last]]).astype(np.int64)
        if pad_id != eos_id:
            if chunk[-2] != eos_id and chunk[-2] != pad_id:
                chunk[-1] = eos_id
            if chunk[1] == pad_id:
                chunk[1] = eos_id
        chunks.append(chunk)
    return np.stack(chunks)


def tokenize_sdxl(
    text: Union[str, Sequence[str]], tokenizers, max_token_length: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Captions -> (ids for tokenizer 1, ids for tokenizer 2), each int64 of
    shape (batch, n_chunks, 77), as kohya's ``SdxlTokenizeStrategy.tokenize``."""
    check_max_token_length(max_token_length)
    texts = [text] if isinstance(text, str) else list(text)
    tokenizer1, tokenizer2 = tokenizers
    ids1 = np.stack([get_input_ids(t, tokenizer1, max_token_length) for t in texts])
    ids2 = np.stack([get_input_ids(t, tokenizer2, max_token_length) for t in texts])
    return ids1, ids2
