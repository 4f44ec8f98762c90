"""CLIP text encoders of SDXL (transformers' ``CLIPTextModel`` and
``CLIPTextModelWithProjection`` semantics) in MindSpore.

SDXL conditions its UNet on two text encoders:

* text encoder 1: OpenAI CLIP ViT-L/14 text tower (768 wide, 12 layers,
  ``quick_gelu``). kohya uses ``hidden_states[11]`` (the output of layer 11
  of 12, before the final layer norm).
* text encoder 2: OpenCLIP ViT-bigG/14 text tower (1280 wide, 32 layers,
  exact ``gelu``) with a bias-free ``text_projection``. kohya uses
  ``hidden_states[-2]`` (penultimate layer output) and the projected pooled
  output: ``text_projection(final_layer_norm(last)[eos position])``.

Parameter names are transformers' state-dict names one to one
(``text_model.encoder.layers.0.self_attn.q_proj.weight`` ...), so a
transformers / diffusers checkpoint loads with ``load_clip_state_dict``.
transformers' non-persistent buffer ``text_model.embeddings.position_ids`` is
not a parameter here (positions are always ``0..seq_len-1``); when a
checkpoint carries it, ``load_clip_state_dict`` drops it (old SD checkpoints
sometimes hold a corrupted float copy of it, which must not be used anyway).

The models' ``construct(input_ids, attention_mask=None)`` returns a flat-ish
tuple that graph mode handles:

* ``CLIPTextModel``: ``(last_hidden_state, pooled_output, hidden_states)``
* ``CLIPTextModelWithProjection``:
  ``(last_hidden_state, pooled_output, text_embeds, hidden_states)``

where ``hidden_states`` is a tuple: by default all ``num_hidden_layers + 1``
states (embeddings output, then each layer's output, as transformers'
``output_hidden_states=True``), or only those named by the constructor's
``hidden_state_indices`` (Python indices into that full list, negatives
allowed), or ``()`` when ``output_hidden_states=False``. The ``OUT_*``
constants index the returned tuple.
"""
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from library import layers

# positions in the tuple returned by construct
OUT_LAST_HIDDEN_STATE = 0
OUT_POOLED = 1
OUT_TEXT_EMBEDS = 2  # CLIPTextModelWithProjection only
# hidden_states is the last element of both tuples: ``outputs[-1]``

# hidden states kohya's SDXL training takes from each encoder
SDXL_TE1_HIDDEN_STATE_INDEX = 11
SDXL_TE2_HIDDEN_STATE_INDEX = -2

POSITION_IDS_KEY = "text_model.embeddings.position_ids"


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters, named as transformers' ``CLIPTextConfig``."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    # eos_token_id == 2 is the legacy HF value (SD/SDXL text encoder 1 configs):
    # transformers then pools at argmax(input_ids) (the EOT token has the
    # largest id). Any other value pools at the first position equal to it.
    eos_token_id: int = 2
    output_hidden_states: bool = True

    @classmethod
    def sdxl_text_encoder1(cls, **overrides):
        """OpenAI CLIP ViT-L/14 text tower, as in SDXL's ``text_encoder`` config."""
        cfg = cls(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                  num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2)
        return replace(cfg, **overrides)

    @classmethod
    def sdxl_text_encoder2(cls, **overrides):
        """OpenCLIP ViT-bigG/14 text tower, as in SDXL's ``text_encoder_2`` config
        (pads with "!" = id 0; eos 49407, so pooling takes the first EOS position)."""
        cfg = cls(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                  num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                  hidden_act="gelu", layer_norm_eps=1e-5,
                  pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
        return replace(cfg, **overrides)

    @classmethod
    def tiny(cls, **overrides):
        """Small config of the same topology for tests (text encoder 1 style)."""
        cfg = cls(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=24,
                  num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2)
        return replace(cfg, **overrides)

    @classmethod
    def tiny2(cls, **overrides):
        """Small config in text encoder 2 style (gelu, eos-equality pooling)."""
        cfg = cls(vocab_size=1000, hidden_size=40, intermediate_size=80, projection_dim=24,
                  num_hidden_layers=4, num_attention_heads=5, max_position_embeddings=77,
                  hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=998, eos_token_id=999)
        return replace(cfg, **overrides)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


def _activation(name):
    if name == "quick_gelu":
        return layers.QuickGELU()
    if name == "gelu":
        return layers.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return layers.GELU(approximate="tanh")
    raise ValueError(f"CLIP text model: unsupported hidden_act {name!r} "
                     "(supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)")


class CLIPTextEmbeddings(nn.Cell):
    """Token embedding + learned absolute position embedding (positions 0..S-1)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = layers.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = layers.Embedding(config.max_position_embeddings, config.hidden_size)

    def construct(self, input_ids):
        seq_len = input_ids.shape[-1]
        tokens = self.token_embedding(input_ids)
        positions = self.position_embedding.weight[:seq_len]
        return tokens + positions.astype(tokens.dtype)


class CLIPAttention(nn.Cell):
    """Multi-head self-attention; scores softmaxed in fp32 as transformers' eager path."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.embed_dim = config.hidden_size
        self.scale = float(self.head_dim) ** -0.5
        self.k_proj = layers.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = layers.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = layers.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = layers.Linear(self.embed_dim, self.embed_dim)
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.av = ops.BatchMatMul()

    def _heads(self, x, b, s):
        return ops.transpose(x.reshape(b, s, self.num_heads, self.head_dim), (0, 2, 1, 3))

    def construct(self, x, mask):
        """x: (B, S, D); mask: additive fp32 mask broadcastable to (B, H, S, S)."""
        b, s, _ = x.shape
        q = self._heads(self.q_proj(x), b, s)
        k = self._heads(self.k_proj(x), b, s)
        v = self._heads(self.v_proj(x), b, s)
        scores = self.qk(q, k) * self.scale
        probs = ops.softmax(scores.astype(ms.float32) + mask, axis=-1).astype(x.dtype)
        out = self.av(probs, v)
        out = ops.transpose(out, (0, 2, 1, 3)).reshape(b, s, self.embed_dim)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = layers.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = _activation(config.hidden_act)
        self.fc2 = layers.Linear(config.intermediate_size, config.hidden_size)

    def construct(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = layers.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = layers.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


def _normalise_indices(indices, count):
    out = []
    for i in indices:
        j = int(i) + count if int(i) < 0 else int(i)
        if not 0 <= j < count:
            raise ValueError(f"hidden state index {i} out of range for {count} hidden states "
                             f"(embeddings output + {count - 1} layers)")
        out.append(j)
    return tuple(out)


class CLIPTextTransformer(nn.Cell):
    """Embeddings -> causal pre-LN encoder -> final layer norm -> pooled EOS token."""

    def __init__(self, config: CLIPTextConfig, hidden_state_indices: Optional[Sequence[int]] = None):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = layers.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.num_layers = config.num_hidden_layers
        self.argmax_pooling = config.eos_token_id == 2
        self.eos_token_id = config.eos_token_id
        n = config.num_hidden_layers + 1
        if not config.output_hidden_states:
            keep = ()
        elif hidden_state_indices is None:
            keep = tuple(range(n))
        else:
            keep = _normalise_indices(hidden_state_indices, n)
        self.hidden_state_indices = keep
        # Additive causal mask, built once for the longest sequence and sliced
        # per length: 0 on and below the diagonal, fp32 min above (as transformers).
        p = config.max_position_embeddings
        causal = np.triu(np.full((p, p), np.finfo(np.float32).min, np.float32), k=1)
        self.causal_mask = Tensor(causal)

    def construct(self, input_ids, attention_mask=None):
        seq_len = input_ids.shape[-1]
        mask = self.causal_mask[:seq_len, :seq_len].reshape(1, 1, seq_len, seq_len)
        if attention_mask is not None:
            # (B, S) 1 = attend, 0 = padding -> additive (B, 1, 1, S), as transformers
            pad = (1.0 - attention_mask.astype(ms.float32)) * np.finfo(np.float32).min
            mask = mask + pad.reshape(pad.shape[0], 1, 1, seq_len)
        x = self.embeddings(input_ids)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            states.append(x)
        last = self.final_layer_norm(x)
        pooled = ops.gather(last, self.eos_index(input_ids), 1, batch_dims=1)
        hidden = ()
        for i in self.hidden_state_indices:
            hidden = hidden + (states[i],)
        return last, pooled, hidden

    def eos_index(self, input_ids):
        """Pooling position per sequence, transformers 4.57's rule: argmax of the
        ids when eos_token_id == 2 (legacy configs), else the first EOS position."""
        if self.argmax_pooling:
            return ops.argmax(input_ids, -1)
        return ops.argmax((input_ids == self.eos_token_id).astype(ms.int32), -1)


class CLIPTextModel(nn.Cell):
    """transformers' ``CLIPTextModel``: returns
    ``(last_hidden_state, pooled_output, hidden_states)``."""

    def __init__(self, config: CLIPTextConfig, hidden_state_indices: Optional[Sequence[int]] = None):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config, hidden_state_indices)

    def construct(self, input_ids, attention_mask=None):
        return self.text_model(input_ids, attention_mask)


class CLIPTextModelWithProjection(nn.Cell):
    """transformers' ``CLIPTextModelWithProjection``: returns
    ``(last_hidden_state, pooled_output, text_embeds, hidden_states)`` where
    ``text_embeds = text_projection(pooled_output)`` (Linear without bias)."""

    def __init__(self, config: CLIPTextConfig, hidden_state_indices: Optional[Sequence[int]] = None):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config, hidden_state_indices)
        self.text_projection = layers.Linear(config.hidden_size, config.projection_dim, bias=False)

    def construct(self, input_ids, attention_mask=None):
        last, pooled, hidden = self.text_model(input_ids, attention_mask)
        return last, pooled, self.text_projection(pooled), hidden


def pool_workaround(text_encoder: CLIPTextModelWithProjection, last_hidden_state, input_ids, eos_token_id):
    """kohya's ``pool_workaround``: projected final-layer-normed state at the
    first ``eos_token_id`` position of each sequence (position 0 when a row has
    none). Equal to ``text_embeds`` of a model whose config eos is the same id."""
    index = ops.argmax((input_ids == eos_token_id).astype(ms.int32), -1)
    pooled = ops.gather(last_hidden_state, index, 1, batch_dims=1)
    weight_dtype = text_encoder.text_projection.weight.dtype
    return text_encoder.text_projection(pooled.astype(weight_dtype)).astype(last_hidden_state.dtype)


def sdxl_text_encoder1(hidden_state_indices: Optional[Sequence[int]] = None, **overrides) -> CLIPTextModel:
    """SDXL text encoder 1 (CLIP ViT-L/14 text). Build under ``layers.skip_init()``
    when weights are loaded afterwards."""
    return CLIPTextModel(CLIPTextConfig.sdxl_text_encoder1(**overrides), hidden_state_indices)


def sdxl_text_encoder2(hidden_state_indices: Optional[Sequence[int]] = None,
                       **overrides) -> CLIPTextModelWithProjection:
    """SDXL text encoder 2 (OpenCLIP ViT-bigG/14 text, with projection)."""
    return CLIPTextModelWithProjection(CLIPTextConfig.sdxl_text_encoder2(**overrides), hidden_state_indices)


def load_clip_state_dict(model: nn.Cell, arrays, strict=True):
    """Load a transformers-named state dict (name -> array) into ``model``.

    ``text_model.embeddings.position_ids`` (a transformers buffer, not a
    parameter) is dropped when present. Returns (missing, unexpected) as
    ``layers.load_param_dict``.
    """
    arrays = {k: v for k, v in arrays.items() if k != POSITION_IDS_KEY}
    return layers.load_param_dict(model, arrays, strict=strict)


def cast_params(model: nn.Cell, dtype=ms.float16):
    """Cast every parameter in place (``Parameter.set_data`` keeps the old dtype;
    ``set_dtype`` changes it). The model then computes in ``dtype``, with layer
    norm statistics and attention softmax in fp32. bfloat16 matmuls have no
    CPU kernel."""
    changed = False
    for p in model.get_parameters():
        if p.dtype != dtype:
            p.set_dtype(dtype)
            changed = True
    if changed:  # parameter dtypes are not part of the compiled-graph key
        layers.recompile_on_next_call(model)
    return model
