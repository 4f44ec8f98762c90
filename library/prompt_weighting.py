"""kohya's ``--weighted_captions`` and its sample prompts' weighting: ``(word:1.2)`` attention syntax.

kohya (``library/strategy_base.py`` ``TokenizeStrategy._get_weighted_input_ids``,
``library/strategy_sdxl.py`` ``SdxlTokenizeStrategy.tokenize_with_weights`` and
``SdxlTextEncodingStrategy.encode_tokens_with_weights``; the syntax is AUTOMATIC1111's):

* ``parse_prompt_attention``: ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` by 1/1.1,
  ``(text:1.3)`` by 1.3; brackets nest (the factors multiply); an unclosed ``(``/``[`` applies to the
  rest of the prompt; ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; an
  unmatched ``)``/``]`` is kept as text; runs of equal weight are merged.
* each piece is tokenised on its own (bos/eos dropped), every token gets its piece's weight; the text
  is cut to the ``max_token_length`` room (75, 150 or 225 tokens; a warning when cut), then bos, eos and
  padding (weight 1) are added and the ids are split into 77-token chunks as unweighted captions are
  (``token_chunking.chunk_input_ids``).
* the text encoders run on the ids; their hidden states (text encoder 1's and 2's, after the chunks
  are joined back) are multiplied token by token by the weights. No renormalisation (kohya's SDXL
  strategy has none: the mean-restoring rescale of the old ``get_weighted_text_embeddings`` is not
  used for SDXL), and the pooled output of text encoder 2 is not weighted.

The chunk-wise multiplication kohya does (each chunk's 75 inner states by that chunk's inner
weights; the first <BOS> and the last state untouched) equals multiplying the joined states
(``n*75+2`` of them) by the unchunked weight list, whose first and last entries are 1: so the
weights here are one (B, T) array per text encoder, T = 77 or ``max_token_length + 2``.
"""
from __future__ import annotations

import logging
import re
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from library.token_chunking import check_max_token_length, chunk_input_ids, tokenizer_max_length

logger = logging.getLogger(__name__)

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# one lexical piece of a prompt (the alternatives do not overlap, first match wins)
_PIECE = re.compile(r"""
    (?P<escaped>\\[()\[\]\\])      # \( \) \[ \] \\ : the character itself
  | (?P<backslash>\\)              # any other backslash: dropped
  | :(?P<weight>[+-]?[.\d]+)\)     # ":1.3)" closes the innermost "(" with that weight
  | (?P<bracket>[()\[\]])
  | (?P<text>[^\\()\[\]:]+)
  | (?P<colon>:)                   # a ":" not followed by a weight and ")": text
""", re.VERBOSE)


def parse_prompt_attention(text: str) -> List[list]:
    """A prompt -> [[text, weight], ...] (kohya's ``parse_prompt_attention``; see the module doc)."""
    out: List[list] = []
    open_round: List[int] = []  # index into ``out`` where each open "(" starts
    open_square: List[int] = []

    def scale_from(start, factor):
        for item in out[start:]:
            item[1] *= factor

    for m in _PIECE.finditer(text):
        piece = m.group(0)
        if m.group("escaped") is not None:
            out.append([piece[1:], 1.0])
        elif m.group("backslash") is not None:
            out.append(["", 1.0])
        elif m.group("weight") is not None and open_round:
            try:
                factor = float(m.group("weight"))
            except ValueError:
                raise ValueError(f"bad attention weight {piece!r} in prompt {text!r}") from None
            scale_from(open_round.pop(), factor)
        elif piece == "(":
            open_round.append(len(out))
        elif piece == "[":
            open_square.append(len(out))
        elif piece == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif piece == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:  # text, a lone ":", an unmatched ")"/"]" or a ":w)" with no "(" open
            out.append([piece, 1.0])
    for start in open_round:  # unclosed: to the end of the prompt
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)
    if not out:
        return [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


def weighted_input_ids(text: str, tokenizer, max_token_length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One prompt -> (ids int64 (n_chunks, 77), weights float32 (T,)), T = 77 or max_token_length + 2:
    the weight of every token of the joined hidden states (1 for bos, eos and padding)."""
    total = tokenizer_max_length(tokenizer, max_token_length)
    room = total - 2
    tokens: List[int] = []
    weights: List[float] = []
    for piece, weight in parse_prompt_attention(text):
        ids = tokenizer(piece)["input_ids"][1:-1]
        tokens += ids
        weights += [weight] * len(ids)
        if len(tokens) > room:
            break
    if len(tokens) > room:
        logger.warning("prompt cut to %d tokens (--max_token_length): %.60s...", room, text)
        tokens, weights = tokens[:room], weights[:room]
    ids = [tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (room - len(tokens))
    full_weights = np.ones(total, np.float32)
    full_weights[1:1 + len(weights)] = weights
    return chunk_input_ids(np.asarray(ids, np.int64), tokenizer), full_weights


def tokenize_sdxl_weighted(text: Union[str, Sequence[str]], tokenizers, max_token_length: Optional[int] = None):
    """Prompts -> ((ids1, ids2) int64 (B, n_chunks, 77), (weights1, weights2) float32 (B, T)), as kohya's
    ``SdxlTokenizeStrategy.tokenize_with_weights`` (weights already joined, see the module doc)."""
    check_max_token_length(max_token_length)
    texts = [text] if isinstance(text, str) else list(text)
    ids, weights = [], []
    for tokenizer in tokenizers:
        pairs = [weighted_input_ids(t, tokenizer, max_token_length) for t in texts]
        ids.append(np.stack([p[0] for p in pairs]))
        weights.append(np.stack([p[1] for p in pairs]))
    return tuple(ids), tuple(weights)

