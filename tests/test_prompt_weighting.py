"""--weighted_captions / sample prompt weighting (library/prompt_weighting.py): kohya's attention syntax,
the weighted tokens, and the weighted hidden states against kohya's formula on tiny CLIPs in torch."""
import numpy as np
import pytest
import torch

from conftest import assert_close  # noqa: E402  (conftest imports library before mindspore)

import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn  # noqa: E402

from library import clip_text_model as ctm  # noqa: E402
from library.prompt_weighting import parse_prompt_attention, tokenize_sdxl_weighted  # noqa: E402
from library.token_chunking import tokenize_sdxl  # noqa: E402


# kohya's parse_prompt_attention docstring (library/strategy_base.py), with the exact float products
@pytest.mark.parametrize("text,expected", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    # and the rest of the grammar: [x] = 1/1.1, unmatched closers and a weight with no "(" are text
    ("[dim] x) y] :2)", [["dim", 1 / 1.1], [" x) y] :2)", 1.0]]),
    ("", [["", 1.0]]),
])
def test_parse_prompt_attention_kohya_examples(text, expected):
    assert parse_prompt_attention(text) == expected


def test_weighted_tokens_and_weights():
    """Each piece tokenised alone: the ids are those of the caption without the syntax; every token
    carries its piece's weight, bos/eos/padding 1; --max_token_length 150: two chunks, T = 152."""
    from library.clip_tokenizer import load_tokenizers

    tokenizers = load_tokenizers()
    (ids1, ids2), (w1, w2) = tokenize_sdxl_weighted(["a (cat:1.3) on [mat], ((sky))"], tokenizers)
    plain1, plain2 = tokenize_sdxl(["a cat on mat, sky"], tokenizers)
    assert np.array_equal(ids1, plain1) and np.array_equal(ids2, plain2)
    expected = np.ones(77, np.float32)
    expected[1:7] = [1.0, 1.3, 1.0, 1 / 1.1, 1.0, 1.1 * 1.1]  # a cat on mat , sky
    assert w1.shape == w2.shape == (1, 77)
    assert np.array_equal(w1[0], expected) and np.array_equal(w2[0], expected)

    long = " ".join(["cat"] * 80 + ["(dog:0.5)"] * 10)  # the dogs are tokens 81..90: in the second chunk
    (ids1, ids2), (w1, _) = tokenize_sdxl_weighted([long], tokenizers, 150)
    plain1, plain2 = tokenize_sdxl([" ".join(["cat"] * 80 + ["dog"] * 10)], tokenizers, 150)
    assert ids1.shape == (1, 2, 77) and np.array_equal(ids1, plain1) and np.array_equal(ids2, plain2)
    assert w1.shape == (1, 152) and np.flatnonzero(w1[0] != 1.0).tolist() == list(range(81, 91))


def _clip_pair(cfg, projection, seed):
    from test_clip_parity import _pair

    return _pair(cfg, projection, seed)


@pytest.mark.parametrize("max_token_length", [None, 150])
def test_weighted_hidden_states_match_kohya_formula(max_token_length):
    """get_hidden_states_sdxl with token weights, compiled (graph mode, as in the train step), against
    kohya's encode_tokens_with_weights in torch: transformers' CLIPs on the same weights, chunks joined,
    then each chunk's 75 inner states times that chunk's inner weights; pool2 unweighted."""
    from library.sdxl_train_util import get_hidden_states_sdxl

    cfg1, cfg2 = ctm.CLIPTextConfig.tiny(), ctm.CLIPTextConfig.tiny2(bos_token_id=998, eos_token_id=500)
    ref1, te1 = _clip_pair(cfg1, False, 1)
    ref2, te2 = _clip_pair(cfg2, True, 2)
    n = 1 if max_token_length is None else max_token_length // 75
    b = 2
    rng = np.random.default_rng(4)
    ids1 = rng.integers(1, 990, (b, n, 77))
    ids1[:, :, 0] = 998
    ids1[:, :, -1] = cfg1.eos_token_id
    ids2 = rng.integers(1, 499, (b, n, 77))
    ids2[:, :, 0] = 998
    ids2[:, :, -1] = 500
    # kohya's chunked weights (B, n, 77): 1 at each chunk's bos and last position
    chunk_w = rng.uniform(0.5, 1.6, (2, b, n, 77)).astype(np.float32)
    chunk_w[..., 0] = chunk_w[..., -1] = 1.0
    # ours: one weight per joined state (what prompt_weighting.weighted_input_ids returns)
    flat_w = [np.concatenate([np.ones((b, 1), np.float32)] + [w[:, c, 1:76] for c in range(n)]
                             + [np.ones((b, 1), np.float32)], 1) if n > 1 else w[:, 0] for w in chunk_w]

    class Encode(nn.Cell):
        def __init__(self):
            super().__init__()
            self.te1, self.te2 = te1, te2

        def construct(self, a, c, w1, w2):
            return get_hidden_states_sdxl(max_token_length, a, c, None, None, self.te1, self.te2,
                                          eos_token_id2=500, token_weights1=w1, token_weights2=w2)

    ms.set_context(mode=ms.GRAPH_MODE)
    h1, h2, pool2 = Encode()(Tensor(ids1.astype(np.int32)), Tensor(ids2.astype(np.int32)), Tensor(flat_w[0]),
                             Tensor(flat_w[1]))

    with torch.no_grad():
        s1 = ref1(torch.tensor(ids1.reshape(-1, 77)), output_hidden_states=True).hidden_states[-2]
        out2 = ref2(torch.tensor(ids2.reshape(-1, 77)), output_hidden_states=True)
        s2 = out2.hidden_states[-2]
    expected = []
    for s, w in ((s1, chunk_w[0]), (s2, chunk_w[1])):
        s = s.reshape(b, n * 77, -1)
        if n > 1:  # kohya's join: <BOS>, each chunk's 75 inner states, the last state
            s = torch.cat([s[:, :1]] + [s[:, c * 77 + 1:c * 77 + 76] for c in range(n)] + [s[:, -1:]], 1)
            w = torch.tensor(w)
            for c in range(n):  # kohya's encode_tokens_with_weights, chunk by chunk
                s[:, c * 75 + 1:c * 75 + 76] = s[:, c * 75 + 1:c * 75 + 76] * w[:, c, 1:-1].unsqueeze(-1)
        else:
            s = s * torch.tensor(w)[:, 0].unsqueeze(2)
        expected.append(s.numpy())
    assert h1.shape == (b, n * 75 + 2 if n > 1 else 77, cfg1.hidden_size)
    assert_close(h1.asnumpy(), expected[0], what="hidden1")
    assert_close(h2.asnumpy(), expected[1], what="hidden2")
    # pool2 is not weighted: kohya's first-EOS pooling of the first chunk
    last = out2.last_hidden_state.numpy()
    first_eos = (ids2.reshape(-1, 77) == 500).argmax(-1)
    pooled = last[np.arange(b * n), first_eos] @ ref2.text_projection.weight.detach().numpy().T
    assert_close(pool2.asnumpy(), pooled.reshape(b, n, -1)[:, 0], what="pool2")
