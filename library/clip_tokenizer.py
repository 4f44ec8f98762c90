"""CLIP byte-level BPE tokenizer that works offline.

Both SDXL text encoders use OpenAI CLIP's BPE vocabulary (49408 ids: 256 byte
symbols, the same with the word-end marker ``</w>``, 48894 merges,
``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407). The merge list is
carried by the project in ``library/clip_bpe/bpe_simple_vocab_16e6.txt.gz``
(see the NOTICE there), so nothing is fetched from the Hugging Face hub.

The behaviour matches transformers' slow ``CLIPTokenizer`` as kohya's
sd-scripts uses it (with ftfy installed):

* special tokens (bos, eos, unk and the pad token) are cut out of the raw text
  first and never split; each remaining piece is cleaned with
  ``ftfy.fix_text``, whitespace runs collapsed, stripped and lower-cased, then
  pre-tokenised with CLIP's regex and BPE-encoded;
* ``tokenizer(text, padding="max_length", max_length=N, truncation=True)``
  truncates the text tokens to N - 2, adds bos/eos and pads on the right.

SDXL's tokenizer 1 (openai/clip-vit-large-patch14) pads with eos (49407);
tokenizer 2 (laion CLIP-ViT-bigG) pads with "!" (id 0). Because "!" is then a
special token, tokenizer 2 -- exactly as transformers does for kohya and
diffusers -- encodes every "!" in a caption as id 0 rather than BPE-merging it
("wow!!" -> [wow</w>, !, !] instead of [wow</w>, !!</w>]).

OpenAI's reference tokenizer additionally runs ``html.unescape`` twice; the
transformers tokenizer (and so kohya) does not: only ftfy's own HTML handling
applies (it unescapes entities unless the text contains "<"). We follow
transformers.

kohya's ``--tokenizer_cache_dir`` (``load_tokenizers(cache_dir)``): kohya reads
each tokenizer from ``<dir>/openai_clip-vit-large-patch14`` and
``<dir>/laion_CLIP-ViT-bigG-14-laion2B-39B-b160k`` (the hub names with "/" ->
"_") when that folder exists, else downloads it and ``save_pretrained``s it
there. Here an existing folder's ``vocab.json`` and ``merges.txt`` are read
(as transformers' CLIPTokenizer reads them); a missing one gets the bundled
vocabulary written in that layout (nothing is downloaded), so a later kohya
run finds it. The special tokens stay SDXL's (bos/eos/unk, pad eos resp. "!"
= id 0, which kohya forces for tokenizer 2); the folders' json configs are
not read.
"""
from __future__ import annotations

import functools
import gzip
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import regex

logger = logging.getLogger(__name__)

BPE_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_bpe", "bpe_simple_vocab_16e6.txt.gz")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SDXL_TOKENIZER2_PAD_TOKEN = "!"
MODEL_MAX_LENGTH = 77
# The gz file holds more merges than CLIP uses: the vocabulary is 49152 BPE
# symbols (256 bytes + 48894 merges + 2 specials) before the </w> doubling.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408

WORD_END = "</w>"

# kohya's tokenizer sources (library/sdxl_train_util.py); its cache folders are these with "/" -> "_"
TOKENIZER1_PATH = "openai/clip-vit-large-patch14"
TOKENIZER2_PATH = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
TOKENIZER_CACHE_SUBDIRS = (TOKENIZER1_PATH.replace("/", "_"), TOKENIZER2_PATH.replace("/", "_"))

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs,
# single digits, and runs of anything that is neither space, letter nor digit.
_PRETOKENIZE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>"
    r"|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE_RUN = regex.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """Map each byte 0..255 to a printable unicode character.

    Printable Latin-1 bytes ("!".."~", "\u00a1".."\u00ac", "\u00ae".."\u00ff") map to
    themselves; the other 68 bytes (controls, space, soft hyphen, ...) map,
    in byte order, to U+0100, U+0101, ... The dict's insertion order (the
    self-mapped bytes first, then the shifted ones) is the id order of the
    first 256 vocabulary entries.
    """
    kept = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@functools.lru_cache(maxsize=4)
def load_bpe_vocab(bpe_path: Optional[str] = None) -> Tuple[Tuple[Tuple[str, str], ...], Dict[str, int]]:
    """Read the gz merge list; return (merges in rank order, token -> id)."""
    path = bpe_path or BPE_VOCAB_PATH
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            f.readline()  # header line ("#version: 0.2")
            merges = []
            for _ in range(NUM_MERGES):
                line = f.readline()
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"merge {len(merges) + 1} is {line!r}, expected two symbols")
                merges.append((parts[0], parts[1]))
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid CLIP BPE vocabulary file ({e})") from e

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + WORD_END for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    encoder = {tok: i for i, tok in enumerate(tokens)}
    if len(encoder) != VOCAB_SIZE:
        raise ValueError(f"{path}: CLIP BPE vocabulary has {len(encoder)} distinct tokens, expected {VOCAB_SIZE}")
    return tuple(merges), encoder


def load_hf_vocab(vocab_path: str, merges_path: str) -> Tuple[Tuple[Tuple[str, str], ...], Dict[str, int]]:
    """Read Hugging Face tokenizer files (``vocab.json``: token -> id, ``merges.txt``: a header line, then one
    merge per line) as transformers' CLIPTokenizer does: the first line is skipped and at most CLIP's
    48894 merges are used. -> (merges in rank order, token -> id); ValueError naming the bad file."""
    try:
        with open(vocab_path, encoding="utf-8") as f:
            encoder = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{vocab_path}: not a readable tokenizer vocabulary ({e})") from e
    if not isinstance(encoder, dict) or not encoder or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in encoder.items()):
        raise ValueError(f"{vocab_path}: not a tokenizer vocabulary (a JSON object of token -> integer id)")
    for token in (BOS_TOKEN, EOS_TOKEN):
        if token not in encoder:
            raise ValueError(f"{vocab_path}: the vocabulary has no {token}")
    try:
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().strip().split("\n")[1:NUM_MERGES + 1]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{merges_path}: not a readable merges file ({e})") from e
    merges = []
    for n, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{merges_path}: line {n} is {line!r}, expected two symbols")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"{merges_path}: holds no merges")
    return tuple(merges), encoder


def whitespace_clean(text: str) -> str:
    return _WHITESPACE_RUN.sub(" ", text).strip()


class BatchEncoding(dict):
    """Dict of model inputs with attribute access (``enc.input_ids``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CLIPTokenizer:
    """CLIP BPE tokenizer with the subset of transformers' API kohya uses."""

    def __init__(
        self,
        bpe_path: Optional[str] = None,
        pad_token: str = EOS_TOKEN,
        model_max_length: int = MODEL_MAX_LENGTH,
        vocab_file: Optional[str] = None,
        merges_file: Optional[str] = None,
    ):
        """The bundled vocabulary (or the gz merge list ``bpe_path``), or with ``vocab_file`` and
        ``merges_file`` Hugging Face tokenizer files (``load_hf_vocab``)."""
        if (vocab_file is None) != (merges_file is None):
            raise ValueError("vocab_file and merges_file go together")
        if vocab_file is not None:
            merges, encoder = load_hf_vocab(vocab_file, merges_file)
        else:
            merges, encoder = load_bpe_vocab(bpe_path)
        self.encoder: Dict[str, int] = encoder
        self.decoder: Dict[int, str] = {i: t for t, i in encoder.items()}
        self.bpe_ranks: Dict[Tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.model_max_length = model_max_length

        self.bos_token = BOS_TOKEN
        self.eos_token = EOS_TOKEN
        self.unk_token = EOS_TOKEN
        if pad_token not in encoder:
            raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
        self.pad_token = pad_token

        self.special_tokens: Dict[str, int] = {
            t: encoder[t] for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token)
        }
        # Longest first, so that at one position the longest special token wins.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_split = regex.compile("(" + "|".join(regex.escape(t) for t in alternatives) + ")")
        self.cache: Dict[str, str] = {BOS_TOKEN: BOS_TOKEN, EOS_TOKEN: EOS_TOKEN}

    # ids of the special tokens ------------------------------------------------
    @property
    def bos_token_id(self) -> int:
        return self.encoder[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.encoder[self.eos_token]

    @property
    def unk_token_id(self) -> int:
        return self.encoder[self.unk_token]

    @property
    def pad_token_id(self) -> int:
        return self.encoder[self.pad_token]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder)

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"pad_token={self.pad_token!r}, pad_token_id={self.pad_token_id})"
        )

    # tokenisation ---------------------------------------------------------------
    def bpe(self, token: str) -> str:
        """BPE-encode one pre-token (already mapped to byte symbols).

        Returns the symbols joined by spaces; the last symbol carries </w>.
        Repeatedly merges every non-overlapping occurrence (left to right) of
        the adjacent pair with the lowest merge rank until no pair is ranked.
        """
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = list(token[:-1]) + [token[-1] + WORD_END]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best_rank = None
            best_pair = None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_pair = rank, pair
            if best_pair is None:
                break
            first, second = best_pair
            merged = []
            i = 0
            n = len(word)
            while i < n:
                if i + 1 < n and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = " ".join(word)
        self.cache[token] = result
        return result

    def _tokenize_piece(self, text: str) -> List[str]:
        text = whitespace_clean(ftfy.fix_text(text)).lower()
        out: List[str] = []
        for pre_token in _PRETOKENIZE.findall(text):
            symbols = "".join(self.byte_encoder[b] for b in pre_token.encode("utf-8"))
            out.extend(self.bpe(symbols).split(" "))
        return out

    def tokenize(self, text: str) -> List[str]:
        """Text -> BPE token strings (no bos/eos added)."""
        tokens: List[str] = []
        for piece in self._special_split.split(text):
            if not piece:
                continue
            if piece in self.special_tokens:
                tokens.append(piece)
            else:
                tokens.extend(self._tokenize_piece(piece))
        return tokens

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[int, List[int]]:
        if isinstance(tokens, str):
            return self.special_tokens.get(tokens, self.encoder.get(tokens, self.unk_token_id))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def _encode_one(self, text: str, add_special_tokens: bool, max_length: Optional[int], truncation: bool) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if truncation:
            limit = max_length - (2 if add_special_tokens else 0)
            if limit < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the bos/eos tokens")
            ids = ids[:limit]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids + [self.eos_token_id]
        return ids

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        padding: Union[bool, str] = False,
        truncation: Union[bool, str] = False,
        max_length: Optional[int] = None,
    ) -> List[int]:
        """One text -> list of ids (bos ... eos, optionally truncated/padded)."""
        return self(
            text, padding=padding, truncation=truncation, max_length=max_length, add_special_tokens=add_special_tokens
        )["input_ids"]

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        padding: Union[bool, str] = False,
        truncation: Union[bool, str] = False,
        max_length: Optional[int] = None,
        return_tensors: Optional[str] = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Tokenise a text or a list of texts, as transformers' tokenizer call.

        padding: False / "do_not_pad", True / "longest", or "max_length"
        (pad to ``max_length``, default ``model_max_length``). truncation:
        True / "longest_first" / "only_first" cut to ``max_length`` (default
        ``model_max_length``) including bos/eos. return_tensors: None (lists;
        a flat list for one str) or "np" (int64 array, 2-D).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)

        if padding is True:
            padding = "longest"
        elif padding is False or padding is None:
            padding = "do_not_pad"
        if padding not in ("do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding={padding!r} is not supported (False, True, 'longest' or 'max_length')")
        if truncation is True:
            truncation = "longest_first"
        elif truncation is False or truncation is None:
            truncation = "do_not_truncate"
        if truncation not in ("do_not_truncate", "longest_first", "only_first"):
            raise ValueError(f"truncation={truncation!r} is not supported (False, True or 'longest_first')")
        truncate = truncation != "do_not_truncate"
        if max_length is None and (truncate or padding == "max_length"):
            max_length = self.model_max_length
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported: use None or 'np'")

        all_ids = [self._encode_one(t, add_special_tokens, max_length, truncate) for t in texts]
        if padding == "longest":
            target = max((len(ids) for ids in all_ids), default=0)
        elif padding == "max_length":
            target = max_length
        else:
            target = None
        masks = []
        for k, ids in enumerate(all_ids):
            n = len(ids)
            if target is not None and n < target:
                all_ids[k] = ids + [self.pad_token_id] * (target - n)
            masks.append([1] * n + [0] * (len(all_ids[k]) - n))

        if return_tensors == "np":
            lengths = {len(ids) for ids in all_ids}
            if len(lengths) > 1:
                raise ValueError("texts tokenise to different lengths: pass padding='max_length' or True for arrays")
            input_ids = np.asarray(all_ids, dtype=np.int64).reshape(len(all_ids), -1)
            attention_mask = np.asarray(masks, dtype=np.int64).reshape(len(all_ids), -1)
        elif single:
            input_ids, attention_mask = all_ids[0], masks[0]
        else:
            input_ids, attention_mask = all_ids, masks
        return BatchEncoding(input_ids=input_ids, attention_mask=attention_mask)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text, as transformers' CLIPTokenizer.decode: the token strings
        are concatenated, mapped back to bytes and decoded as UTF-8, each </w>
        becomes a space, and the result is stripped. Special tokens (bos, eos
        and the pad token: "!" for tokenizer 2) stay as their text unless
        ``skip_special_tokens``."""
        special_ids = set(self.special_tokens.values())
        tokens = [self.decoder[int(i)] for i in ids if not (skip_special_tokens and int(i) in special_ids)]
        data = bytearray(self.byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace(WORD_END, " ").strip()


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer(pad_token=pad_token)


def load_tokenizer1() -> CLIPTokenizer:
    """SDXL text encoder 1 (openai/clip-vit-large-patch14): pads with eos 49407."""
    return _cached_tokenizer(EOS_TOKEN)


def load_tokenizer2() -> CLIPTokenizer:
    """SDXL text encoder 2 (laion CLIP-ViT-bigG): pads with "!" = id 0, as kohya."""
    return _cached_tokenizer(SDXL_TOKENIZER2_PAD_TOKEN)


def load_tokenizers(cache_dir: Optional[str] = None) -> List[CLIPTokenizer]:
    """[tokenizer1, tokenizer2] for SDXL, from the vocabulary the project carries, or with ``cache_dir``
    (kohya's ``--tokenizer_cache_dir``) from the tokenizer files there (see the module doc); a problem with
    the folder or its files is a UserError naming it."""
    if not cache_dir:
        return [load_tokenizer1(), load_tokenizer2()]
    from library.device_utils import UserError

    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise UserError(f"--tokenizer_cache_dir {cache_dir}: is a file, not a folder")
    tokenizers = []
    for subdir, pad_token in zip(TOKENIZER_CACHE_SUBDIRS, (EOS_TOKEN, SDXL_TOKENIZER2_PAD_TOKEN)):
        path = os.path.join(cache_dir, subdir)
        if os.path.exists(path):  # kohya's test: an existing folder is the cached tokenizer
            logger.info(f"load tokenizer from cache: {path}")
            tokenizers.append(_tokenizer_from_folder(path, pad_token))
        else:
            logger.info(f"save Tokenizer to cache: {path} (the bundled CLIP vocabulary; nothing is downloaded)")
            _write_cache_folder(path, pad_token)
            tokenizers.append(_cached_tokenizer(pad_token))
    return tokenizers


def _tokenizer_from_folder(path: str, pad_token: str) -> CLIPTokenizer:
    from library.device_utils import UserError

    if not os.path.isdir(path):
        raise UserError(f"{path}: is a file, not a tokenizer folder (--tokenizer_cache_dir)")
    files = [os.path.join(path, name) for name in ("vocab.json", "merges.txt")]
    for file in files:
        if not os.path.isfile(file):
            raise UserError(f"{file}: missing (a --tokenizer_cache_dir tokenizer folder holds vocab.json and "
                            "merges.txt, as transformers' save_pretrained writes them)")
    try:
        tokenizer = CLIPTokenizer(pad_token=pad_token, vocab_file=files[0], merges_file=files[1])
    except ValueError as e:
        message = str(e) if str(e).startswith(path) else f"{files[0]}: {e}"
        raise UserError(message) from None
    if pad_token == SDXL_TOKENIZER2_PAD_TOKEN and tokenizer.pad_token_id != 0:
        # kohya pads tokenizer 2 with id 0 and splits its pad token "!" out of the text: the two agree only so
        raise UserError(f"{files[0]}: '!' has id {tokenizer.pad_token_id}, expected 0 (SDXL's tokenizer 2 "
                        "pads with id 0)")
    return tokenizer


def _write_cache_folder(path: str, pad_token: str) -> None:
    """The bundled vocabulary as Hugging Face files in ``path``: written in a temporary folder renamed into
    place, so that an interrupted write (or another process of the same job) never leaves a partial folder
    that a later run would take for the cache."""
    import shutil

    from library.device_utils import UserError

    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        write_hf_tokenizer_files(tmp, pad_token=pad_token)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):  # not written by another process meanwhile
                raise
    except OSError as e:
        raise UserError(f"{path}: cannot write the tokenizer cache ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_hf_tokenizer_files(
    output_dir: str,
    pad_token: str = EOS_TOKEN,
    bpe_path: Optional[str] = None,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> Dict[str, str]:
    """Write ``vocab.json`` + ``merges.txt`` (Hugging Face layout) and the
    small ``tokenizer_config.json`` / ``special_tokens_map.json`` so that
    ``transformers.CLIPTokenizer.from_pretrained(output_dir)`` loads the same
    vocabulary (pass ``pad_token="!"`` for SDXL's tokenizer 2). Each file is
    written atomically. Returns {name: path}."""
    from library.path_utils import atomic_write_text

    merges, encoder = load_bpe_vocab(bpe_path)
    if pad_token not in encoder:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    os.makedirs(output_dir, exist_ok=True)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length)
    contents = {
        "vocab.json": json.dumps(encoder, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }
    paths = {}
    for name, text in contents.items():
        path = os.path.join(output_dir, name)
        atomic_write_text(path, text)
        paths[name] = path
    return paths


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a file: library/

    parser = argparse.ArgumentParser(description="write the CLIP BPE vocabulary as Hugging Face tokenizer files")
    parser.add_argument("output_dir")
    parser.add_argument("--pad_token", default=EOS_TOKEN, help='"<|endoftext|>" (tokenizer 1) or "!" (SDXL tokenizer 2)')
    args = parser.parse_args()
    for p in write_hf_tokenizer_files(args.output_dir, pad_token=args.pad_token).values():
        print(p)
