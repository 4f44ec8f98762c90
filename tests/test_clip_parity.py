"""Parity of library.clip_text_model against transformers' CLIPTextModel /
CLIPTextModelWithProjection on the same random weights (forward and grads)."""
import numpy as np
import pytest

from conftest import assert_close

import mindspore as ms
from mindspore import Tensor

from library import clip_text_model as ctm
from library import layers

import torch  # noqa: E402  (test-only reference)
import transformers  # noqa: E402
from sdxl_checkpoint_helpers import randomize  # noqa: E402

SEQ = 77


def _hf_config(cfg: ctm.CLIPTextConfig):
    c = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.projection_dim, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    c._attn_implementation = "eager"
    return c


def _pair(cfg, projection, seed):
    hf_cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    torch.manual_seed(seed)
    ref = hf_cls(_hf_config(cfg)).eval()
    randomize(ref, seed)
    ours_cls = ctm.CLIPTextModelWithProjection if projection else ctm.CLIPTextModel
    with layers.skip_init():
        ours = ours_cls(cfg)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    missing, unexpected = ctm.load_clip_state_dict(ours, state)
    assert not missing and not unexpected
    return ref, ours


def _ids_te1(cfg, seed):
    """TE1 style: bos, text, eos, padded with eos (argmax ties -> first eos)."""
    rng = np.random.default_rng(seed)
    bos, eos = cfg.vocab_size - 2, cfg.vocab_size - 1
    ids = np.full((2, SEQ), eos, np.int64)
    for row, n in enumerate((5, 40)):
        ids[row, 0] = bos
        ids[row, 1:n + 1] = rng.integers(1, cfg.vocab_size - 2, n)
        ids[row, n + 1] = eos
    return ids


def _ids_te2(cfg, seed):
    """TE2 style (eos not the largest id): row 0 padded with '!' (id 0), row 1
    padded with eos and holding ids above eos in its text, so argmax-of-ids
    pooling would pick another position than the first-eos rule."""
    rng = np.random.default_rng(seed)
    eos = cfg.eos_token_id
    ids = np.zeros((2, SEQ), np.int64)
    for row, n in enumerate((9, 60)):
        ids[row, 0] = cfg.bos_token_id
        ids[row, 1:n + 1] = rng.integers(1, eos, n)
        ids[row, n + 1] = eos
    ids[1, n + 2:] = eos
    ids[1, 7] = cfg.vocab_size - 1
    assert ids[1].argmax() != n + 1
    return ids


CASES = {
    "te1_quick_gelu": (ctm.CLIPTextConfig.tiny(), False, _ids_te1),
    "te2_gelu_projection": (ctm.CLIPTextConfig.tiny2(bos_token_id=998, eos_token_id=500), True, _ids_te2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_parity(case, ms_mode):
    cfg, projection, make_ids = CASES[case]
    ref, ours = _pair(cfg, projection, seed=1)
    ids = make_ids(cfg, seed=2)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = ours(Tensor(ids))
    hidden = got[-1]
    assert len(hidden) == cfg.num_hidden_layers + 1 == len(out.hidden_states)
    errs = {}
    for i, (a, e) in enumerate(zip(hidden, out.hidden_states)):
        errs[f"hidden_states[{i}]"] = assert_close(a.asnumpy(), e.numpy(), what=f"hidden_states[{i}]")
    errs["last_hidden_state"] = assert_close(got[ctm.OUT_LAST_HIDDEN_STATE].asnumpy(),
                                             out.last_hidden_state.numpy(), what="last_hidden_state")
    if projection:
        # transformers' WithProjection output has no pooler_output: recompute it
        pooled_ref = ref.text_model(torch.from_numpy(ids)).pooler_output.detach().numpy()
        errs["text_embeds"] = assert_close(got[ctm.OUT_TEXT_EMBEDS].asnumpy(), out.text_embeds.numpy(),
                                           what="text_embeds")
    else:
        pooled_ref = out.pooler_output.numpy()
    errs["pooled"] = assert_close(got[ctm.OUT_POOLED].asnumpy(), pooled_ref, what="pooled")
    print(case, ms_mode, {k: f"{v:.2e}" for k, v in errs.items()})


def test_hidden_state_selection_and_pool_workaround(ms_mode):
    """kohya's picks: TE1 hidden_states[11]-style index, TE2 penultimate + pooled."""
    cfg, _, make_ids = CASES["te2_gelu_projection"]
    ref, full = _pair(cfg, True, seed=3)
    ids = make_ids(cfg, seed=4)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    with layers.skip_init():
        picked = ctm.CLIPTextModelWithProjection(cfg, hidden_state_indices=(-2, 1))
    ctm.load_clip_state_dict(picked, layers.param_dict(full))
    got = picked(Tensor(ids))
    assert len(got[-1]) == 2
    assert_close(got[-1][0].asnumpy(), out.hidden_states[-2].numpy(), what="penultimate")
    assert_close(got[-1][1].asnumpy(), out.hidden_states[1].numpy(), what="hidden_states[1]")
    pooled = ctm.pool_workaround(picked, got[ctm.OUT_LAST_HIDDEN_STATE], Tensor(ids), cfg.eos_token_id)
    assert_close(pooled.asnumpy(), out.text_embeds.numpy(), what="pool_workaround")

    with layers.skip_init():
        none = ctm.CLIPTextModel(ctm.CLIPTextConfig.tiny(output_hidden_states=False))
    assert none(Tensor(_ids_te1(none.config, 0)))[-1] == ()
    with pytest.raises(ValueError, match="out of range"):
        ctm.CLIPTextModel(ctm.CLIPTextConfig.tiny(), hidden_state_indices=(4,))


def test_attention_mask_parity():
    cfg, _, make_ids = CASES["te1_quick_gelu"]
    ref, ours = _pair(cfg, False, seed=5)
    ids = make_ids(cfg, seed=6)
    mask = np.ones_like(ids)
    mask[0, 8:] = 0
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = ours(Tensor(ids), Tensor(mask))
    assert_close(got[0].asnumpy(), out.last_hidden_state.numpy(), what="masked last_hidden_state")


class _Loss(ms.nn.Cell):
    def __init__(self, model, weights):
        super().__init__()
        self.model = model
        self.w_last, self.w_pooled, self.w_hidden, self.w_embeds = weights

    def construct(self, ids):
        out = self.model(ids)
        loss = (out[0] * self.w_last).sum() + (out[1] * self.w_pooled).sum()
        loss = loss + (out[-1][1] * self.w_hidden).sum()
        if len(out) == 4:
            loss = loss + (out[2] * self.w_embeds).sum()
        return loss


GRAD_PARAMS = ["text_model.encoder.layers.0.self_attn.q_proj.weight",
               "text_model.encoder.layers.{last}.mlp.fc2.weight",
               "text_model.final_layer_norm.weight",
               "text_model.embeddings.token_embedding.weight"]


@pytest.mark.parametrize("case", list(CASES))
def test_grad_parity(case, ms_mode):
    cfg, projection, make_ids = CASES[case]
    ref, ours = _pair(cfg, projection, seed=7)
    ids = make_ids(cfg, seed=8)
    rng = np.random.default_rng(9)
    w = [rng.standard_normal((2, SEQ, cfg.hidden_size)).astype(np.float32),
         rng.standard_normal((2, cfg.hidden_size)).astype(np.float32),
         rng.standard_normal((2, SEQ, cfg.hidden_size)).astype(np.float32),
         rng.standard_normal((2, cfg.projection_dim)).astype(np.float32)]
    names = [n.format(last=cfg.num_hidden_layers - 1) for n in GRAD_PARAMS]
    if projection:
        names.append("text_projection.weight")

    out = ref(torch.from_numpy(ids), output_hidden_states=True)
    pooled = out.pooler_output if not projection else ref.text_model(torch.from_numpy(ids)).pooler_output
    loss = (out.last_hidden_state * torch.from_numpy(w[0])).sum() + (pooled * torch.from_numpy(w[1])).sum()
    loss = loss + (out.hidden_states[1] * torch.from_numpy(w[2])).sum()
    if projection:
        loss = loss + (out.text_embeds * torch.from_numpy(w[3])).sum()
    tparams = dict(ref.named_parameters())
    tgrads = torch.autograd.grad(loss, [tparams[n] for n in names])

    params = {p.name: p for p in ours.get_parameters()}
    net = _Loss(ours, [Tensor(a) for a in w])
    weights = ms.ParameterTuple([params[n] for n in names])
    value, grads = ms.value_and_grad(net, None, weights)(Tensor(ids))
    assert abs(float(value.asnumpy()) - loss.item()) <= 1e-4 * max(1.0, abs(loss.item()))
    for n, g, tg in zip(names, grads, tgrads):
        tg = tg.numpy()
        err = np.abs(g.asnumpy() - tg).max() / max(np.abs(tg).max(), 1e-12)
        print(case, ms_mode, n, params[n].name, f"rel grad err {err:.2e}")
        assert err <= 1e-3, f"{n}: relative grad error {err:.3g}"


def test_fp16_runs(ms_mode):
    cfg, projection, make_ids = CASES["te2_gelu_projection"]
    ref, ours = _pair(cfg, projection, seed=10)
    ids = make_ids(cfg, seed=11)
    want = ours(Tensor(ids))
    ctm.cast_params(ours, ms.float16)
    assert all(p.dtype == ms.float16 for p in ours.get_parameters())
    got = ours(Tensor(ids))
    for a, e, what in ((got[0], want[0], "last"), (got[2], want[2], "text_embeds"),
                       (got[-1][-2], want[-1][-2], "penultimate")):
        assert a.dtype == ms.float16
        a = a.asnumpy().astype(np.float32)
        assert np.isfinite(a).all()
        assert_close(a, e.asnumpy(), rtol_scale=3e-2, what=f"fp16 {what}")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["te1", "te2"])
def test_full_sdxl_encoders_match_transformers_names(which):
    """Full-size SDXL encoders: same parameter names, shapes and counts as
    transformers' models (built on the meta device, so nothing is allocated)."""
    if which == "te1":
        cfg, hf_cls, build = (ctm.CLIPTextConfig.sdxl_text_encoder1(), transformers.CLIPTextModel,
                              ctm.sdxl_text_encoder1)
        expect_count = 123_060_480
    else:
        cfg, hf_cls, build = (ctm.CLIPTextConfig.sdxl_text_encoder2(), transformers.CLIPTextModelWithProjection,
                              ctm.sdxl_text_encoder2)
        expect_count = 694_659_840
    with torch.device("meta"):
        ref = hf_cls(_hf_config(cfg))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ref_shapes.pop(ctm.POSITION_IDS_KEY, None)
    with layers.skip_init():
        ours = build()
    shapes = {p.name: tuple(p.shape) for p in ours.get_parameters()}
    assert shapes == ref_shapes
    assert sum(int(np.prod(s)) for s in shapes.values()) == expect_count
