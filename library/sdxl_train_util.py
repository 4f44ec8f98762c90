"""kohya's ``sdxl_train_util`` (the parts the LoRA trainer uses): SDXL text
conditioning and size embeddings, in MindSpore ops that compile inside the
graph-mode train step.

``get_hidden_states_sdxl`` follows kohya: text encoder 1's hidden state after
layer 11 (``hidden_states[11]``, the penultimate of its 12 layers), text
encoder 2's penultimate hidden state and its pooled output through kohya's
EOS-position workaround (``pool_workaround``: the projected final-normed state
at the first EOS token), the (B, n, 77) chunks of ``--max_token_length``
150/225 joined back as kohya does (first BOS, each chunk's 75 inner tokens,
last EOS), the pooled output of the first chunk. The trainer concatenates the
two hidden states to the UNet context (768 + 1280 = 2048 for SDXL).

For tiny test encoders with fewer than 12 layers the index is their
penultimate layer (``num_hidden_layers - 1``), which is 11 for SDXL.
"""
from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import ops

from library.autoencoder_kl import VAE_SCALE_FACTOR  # noqa: F401  (kohya's name, re-exported)
from library.clip_text_model import pool_workaround
from library.sdxl_original_unet import get_size_embeddings  # noqa: F401  (kohya's name, re-exported)

TOKENIZER_MAX_LENGTH = 77
EOS_TOKEN_ID2 = 49407  # CLIP's end-of-text id (tokenizer 2's eos)


def te1_hidden_index(text_encoder1) -> int:
    """kohya's ``hidden_states[11]`` for the 12-layer SDXL encoder; penultimate layer otherwise."""
    return min(11, text_encoder1.config.num_hidden_layers - 1)


def _join_chunks(hidden, max_token_length, width=TOKENIZER_MAX_LENGTH):
    """(B, n*77, D) -> (B, n*75+2, D): <BOS>, each chunk's 75 inner states, last <EOS>/<PAD>."""
    parts = [hidden[:, 0:1]]
    for i in range(1, max_token_length, width):
        parts.append(hidden[:, i:i + width - 2])
    parts.append(hidden[:, -1:])
    return ops.concat(parts, 1)


def apply_token_weights(hidden, weights):
    """hidden (B, T, D) times weights (B, T) token by token, in float32, returned in hidden's dtype
    (kohya multiplies the autocast states by float32 weights)."""
    return (hidden.astype(ms.float32) * weights.astype(ms.float32).expand_dims(-1)).astype(hidden.dtype)


def get_hidden_states_sdxl(max_token_length, input_ids1, input_ids2, tokenizer1, tokenizer2, text_encoder1,
                           text_encoder2, weight_dtype=None, eos_token_id2=None, token_weights1=None,
                           token_weights2=None):
    """kohya's ``get_hidden_states_sdxl``: ids (B, n, 77) each -> (hidden1 (B, T, D1),
    hidden2 (B, T, D2), pool2 (B, P)), T = 77 or n*75+2.

    ``token_weights1``/``token_weights2`` (B, T) (``--weighted_captions``, sample prompts): the joined
    hidden states multiplied by them token by token, as kohya's ``encode_tokens_with_weights`` (see
    ``library.prompt_weighting``); pool2 is not weighted.

    ``tokenizer1``/``tokenizer2`` may be None (then 77-wide chunks and id 49407 as
    tokenizer 2's EOS are used), so the function can run inside a compiled cell.
    """
    width1 = TOKENIZER_MAX_LENGTH if tokenizer1 is None else tokenizer1.model_max_length
    width2 = TOKENIZER_MAX_LENGTH if tokenizer2 is None else tokenizer2.model_max_length
    if eos_token_id2 is None:
        eos_token_id2 = EOS_TOKEN_ID2 if tokenizer2 is None else tokenizer2.eos_token_id
    b_size = input_ids1.shape[0]
    ids1 = input_ids1.reshape(-1, width1)
    ids2 = input_ids2.reshape(-1, width2)

    _, _, states1 = text_encoder1(ids1)
    hidden1 = states1[te1_hidden_index(text_encoder1)]
    last2, _, _, states2 = text_encoder2(ids2)
    hidden2 = states2[-2]
    pool2 = pool_workaround(text_encoder2, last2, ids2, eos_token_id2)

    hidden1 = hidden1.reshape(b_size, -1, hidden1.shape[-1])
    hidden2 = hidden2.reshape(b_size, -1, hidden2.shape[-1])
    if max_token_length is not None:
        n_size = max_token_length // 75
        hidden1 = _join_chunks(hidden1, max_token_length, width1)
        hidden2 = _join_chunks(hidden2, max_token_length, width2)
        pool2 = pool2.reshape(b_size, n_size, -1)[:, 0]  # kohya: pool2[::n_size]
    if token_weights1 is not None:
        hidden1 = apply_token_weights(hidden1, token_weights1)
        hidden2 = apply_token_weights(hidden2, token_weights2)
    if weight_dtype is not None:
        hidden1 = hidden1.astype(weight_dtype)
        hidden2 = hidden2.astype(weight_dtype)
    return hidden1, hidden2, pool2


def size_embeddings_for_batch(batch, dim=256) -> np.ndarray:
    """The 6*dim size-conditioning vector of a dataset batch (kohya's ``get_size_embeddings``
    of ``original_sizes_hw``, ``crop_top_lefts``, ``target_sizes_hw``), float32 (B, 6*dim)."""
    return get_size_embeddings(np.asarray(batch["original_sizes_hw"], np.float32),
                               np.asarray(batch["crop_top_lefts"], np.float32),
                               np.asarray(batch["target_sizes_hw"], np.float32), dim).astype(np.float32)


__all__ = ["VAE_SCALE_FACTOR", "apply_token_weights", "get_hidden_states_sdxl", "get_size_embeddings", "size_embeddings_for_batch",
           "te1_hidden_index", "ms"]
