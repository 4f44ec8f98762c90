"""The SDXL text-to-image pipeline: prompt -> conditioning -> latents -> image, for one loaded model.

``Generator`` encodes prompts (text encoder 1's and 2's penultimate hidden states, concatenated; the
pooled embedding from text encoder 2), denoises with any ``library.sdxl_schedulers`` scheduler and
classifier-free guidance, and decodes with the VAE. ``sdxl_minimal_inference.py`` and the trainer's
sample images (``library.train_sampling``) both use it. The U-Net step runs as one compiled graph per
layer (``SegmentedDenoise``, the default) or as one graph (``Denoise``).
"""
import logging
import os

import mindspore as ms
from mindspore import nn, ops

from library.device_utils import UserError
from library.dtypes import ms_dtype
from library.path_utils import atomic_write
from library.segments import Segment, SegmentChain
from library.unet_segments import unet_segments

logger = logging.getLogger(__name__)

MAX_TOKENS = 77


def use_penultimate_hidden_state(text_encoder):
    """Return only the penultimate hidden state (kohya's te1 ``hidden_states[11]`` of 12 layers, te2 [-2])."""
    tm = text_encoder.text_model
    tm.hidden_state_indices = (tm.num_layers - 1,)


def penultimate_hidden_state(text_encoder, hidden_states):
    """The penultimate layer's state from the ``hidden_states`` tuple a text encoder returned (all states, or
    only the penultimate after ``use_penultimate_hidden_state``)."""
    tm = text_encoder.text_model
    return hidden_states[tuple(tm.hidden_state_indices).index(tm.num_layers - 1)]


def guidance_input(guided, dtype, x, input_scale, context, y):
    """The U-Net's inputs of one denoising step: latents twice (negative, prompt rows) when guided, scaled
    by 1/sqrt(sigma^2+1), in the U-Net's dtype."""
    if guided:
        x = ops.concat((x, x), 0)
    x = x / input_scale
    return x.astype(dtype), context.astype(dtype), y.astype(dtype)


def guided_epsilon(guided, pred, guidance_scale):
    """Classifier-free guidance of the U-Net's (negative, prompt) prediction, float32."""
    eps = pred.astype(ms.float32)
    if guided:
        b = eps.shape[0] // 2
        uncond = eps[:b]
        eps = uncond + guidance_scale * (eps[b:] - uncond)
    return eps


class Denoise(nn.Cell):
    """(latents, sqrt(sigma^2+1), t, context, y, scale) -> guided epsilon (float32), one compiled graph."""

    def __init__(self, unet, guided, dtype):
        super().__init__(auto_prefix=False)
        self.unet = unet
        self.guided = guided
        self.dtype = dtype

    def construct(self, x, input_scale, t, context, y, guidance_scale):
        x, context, y = guidance_input(self.guided, self.dtype, x, input_scale, context, y)
        return guided_epsilon(self.guided, self.unet(x, t, context, y), guidance_scale)


class _GuidanceIn(nn.Cell):
    def __init__(self, guided, dtype):
        super().__init__(auto_prefix=False)
        self.guided = guided
        self.dtype = dtype

    def construct(self, x, input_scale, context, y):
        return guidance_input(self.guided, self.dtype, x, input_scale, context, y)


class _GuidanceOut(nn.Cell):
    def __init__(self, guided):
        super().__init__(auto_prefix=False)
        self.guided = guided

    def construct(self, pred, guidance_scale):
        return guided_epsilon(self.guided, pred, guidance_scale)


class SegmentedDenoise:
    """``Denoise`` as a forward-only chain of segments (``library.unet_segments``): each layer's graph gives
    its memory back when it ends (one graph for the whole U-Net keeps all of its activations to the
    end), and the transformer blocks share their compiled graphs."""

    def __init__(self, unet, guided, dtype):
        segs = ([Segment("guidance_in", _GuidanceIn(guided, dtype), ("latents", "input_scale", "context_in", "y_in"),
                         ("x", "context", "y"))]
                + unet_segments(unet)
                + [Segment("guidance_out", _GuidanceOut(guided), ("pred", "guidance_scale"), ("eps",))])
        self.chain = SegmentChain(segs, ("latents", "input_scale", "timesteps", "context_in", "y_in",
                                         "guidance_scale"), [])
        self.chain.set_train(False)

    def __call__(self, x, input_scale, t, context, y, guidance_scale):
        values = dict(zip(self.chain.data, (x, input_scale, t, context, y, guidance_scale)))
        return self.chain.forward(values, keep=False)["eps"]


class Generator:
    """Text encoding, denoising (graph mode) and decoding for one loaded model.

    ``one_shot`` (one ``generate_images`` call, not ``--interactive``): the text encoders are dropped after
    the prompt encoding and the U-Net (weights and compiled step) before the last decode (the 1024x1024
    decode needs the memory).
    ``segmented`` (default): the U-Net step runs as one compiled graph per layer
    (``SegmentedDenoise``); False compiles it as one graph (``Denoise``).

    ``prepare_models`` (inference): put the models in eval mode and let the text encoders return only
    the penultimate hidden state. The trainer's samples pass False: the models stay as training set them
    (it switches their train/eval mode itself around sampling) and all hidden states are returned.

    ``prompt_weighting`` (the trainer's samples, as kohya's SDXL sample pipeline always weights):
    ``(word:1.2)`` weights applied to the hidden states (``library.prompt_weighting``) and prompts of up to
    ``max_token_length`` (None: 75, 150 or 225) tokens, encoded in 77-token chunks as training captions.
    """

    def __init__(self, te1, te2, vae, unet, dtype_name="fp32", vae_dtype_name="fp32", prepare_models=True,
                 sequential_guidance=False, one_shot=False, segmented=True, prompt_weighting=False,
                 max_token_length=None):
        from library.vae_segments import SegmentedDecode
        from library.clip_tokenizer import load_tokenizers

        self.ms = ms
        self.te1, self.te2, self.vae, self.unet = te1, te2, vae, unet
        if prepare_models:
            for cell in (te1, te2, vae, unet):
                cell.set_train(False)
            use_penultimate_hidden_state(te1)
            use_penultimate_hidden_state(te2)
            if unet.attention_impl == "plain":  # same results; 1024x1024 needs it (4096-token attention)
                unet.set_attention_impl("chunked")
        self.tokenizer1, self.tokenizer2 = load_tokenizers()
        self.prompt_weighting = prompt_weighting
        self.max_token_length = max_token_length
        self.dtype = ms_dtype(dtype_name)
        if self.dtype != ms.float32:
            unet.to_dtype(self.dtype)
        vae_dtype = ms_dtype(vae_dtype_name)
        if vae_dtype != ms.float32:  # Linear/Conv weights (norms stay fp32), as the loader does
            from library import layers
            for _, cell in vae.cells_and_names():
                if isinstance(cell, (layers.Linear, layers.Conv2d)):
                    for p in cell.get_parameters(expand=False):
                        if p.dtype != vae_dtype:
                            p.set_dtype(vae_dtype)
        self.vae_dtype = vae_dtype
        self.vae_decode = SegmentedDecode(vae)  # one graph per layer (see library.vae_segments)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(unet.config.channel_mult) - 1)
        self.pixel_multiple = self.vae_factor * self.unet_factor
        self.latent_channels = unet.in_channels
        self.size_embedding_total = unet.adm_in_channels  # pooled text embedding + 6 size embeddings

        self.sequential_guidance = sequential_guidance
        self.one_shot = one_shot
        self.segmented = segmented
        self._denoisers = {}

    def check_size(self, width, height):
        m = self.pixel_multiple
        for name, v in (("width", width), ("height", height)):
            if v % m:
                raise UserError(f"{name} {v} is not a multiple of {m}: the VAE downsamples {self.vae_factor}x "
                                f"and the U-Net {self.unet_factor}x more")

    def _tokens(self, tokenizer, texts):
        import numpy as np

        for text in texts:
            n = len(tokenizer(text)["input_ids"])
            if n > MAX_TOKENS:
                logger.warning("prompt is %d tokens; truncated to %d (as kohya's minimal inference): %.60s...",
                               n, MAX_TOKENS, text)
        ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True)["input_ids"]
        return self.ms.Tensor(np.asarray(ids, np.int32).reshape(len(texts), MAX_TOKENS))

    def encode(self, prompts1, prompts2):
        """-> (context (B,77,C1+C2), pooled (B,P)) as numpy float32.

        PyNative: 77 tokens cost no compile worth saving, and a graph-mode call would keep the text
        encoders' weights resident after ``release_text_encoders`` (see ``pynative_mode``)."""
        import numpy as np

        from library.device_utils import pynative_mode

        if self.te1 is None:
            raise RuntimeError("the text encoders were released (one_shot Generator)")
        if self.prompt_weighting:
            return self._encode_weighted(prompts1, prompts2)
        with pynative_mode():
            _, _, hidden1 = self.te1(self._tokens(self.tokenizer1, prompts1))
            _, _, pooled2, hidden2 = self.te2(self._tokens(self.tokenizer2, prompts2))
            context = np.concatenate([penultimate_hidden_state(self.te1, hidden1).asnumpy(),
                                      penultimate_hidden_state(self.te2, hidden2).asnumpy()], -1).astype(np.float32)
            return context, pooled2.asnumpy().astype(np.float32)

    def _encode_weighted(self, prompts1, prompts2):
        """``encode`` with kohya's prompt weighting and ``max_token_length`` chunks (kohya's
        ``tokenize_with_weights`` + ``encode_tokens_with_weights``): the joined penultimate states times
        the token weights; pooled: text encoder 2's of the first chunk, unweighted."""
        import numpy as np

        from library.device_utils import pynative_mode
        from library.prompt_weighting import weighted_input_ids
        from library.sdxl_train_util import _join_chunks, apply_token_weights

        def tokens(tokenizer, texts):
            pairs = [weighted_input_ids(t, tokenizer, self.max_token_length) for t in texts]
            return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

        (ids1, w1), (ids2, w2) = tokens(self.tokenizer1, prompts1), tokens(self.tokenizer2, prompts2)
        b, n, width = ids1.shape
        with pynative_mode():
            _, _, hidden1 = self.te1(self.ms.Tensor(ids1.reshape(-1, width).astype(np.int32)))
            _, _, pooled2, hidden2 = self.te2(self.ms.Tensor(ids2.reshape(-1, width).astype(np.int32)))
            states = []
            for te, hidden, w in ((self.te1, hidden1, w1), (self.te2, hidden2, w2)):
                h = penultimate_hidden_state(te, hidden)
                h = h.reshape(b, n * width, h.shape[-1])
                if self.max_token_length is not None:
                    h = _join_chunks(h, self.max_token_length, width)
                states.append(apply_token_weights(h, self.ms.Tensor(w)).asnumpy())
            context = np.concatenate(states, -1).astype(np.float32)
            pooled = pooled2.asnumpy().reshape(b, n, -1)[:, 0]
            return context, pooled.astype(np.float32)

    def release_text_encoders(self):
        """Drop the text encoders (gigabytes in fp32 for SDXL): one-shot generation encodes its prompts once,
        and at 1024x1024 the VAE decode needs that memory."""
        from library.device_utils import release_host_memory

        self.te1 = self.te2 = None
        release_host_memory()

    def release_unet(self):
        """Drop the U-Net's weights and compiled denoising steps before the last decode of one-shot generation:
        the 1024x1024 VAE decode needs that memory (Limitations.md has the figures). ``sample`` raises
        afterwards."""
        from library.device_utils import release_host_memory

        self._denoisers.clear()
        self.unet = None
        release_host_memory()

    def conditioning(self, prompt, prompt2, negative_prompt, guidance_scale, width, height, original_size=None,
                     crop=(0, 0), target_size=None):
        """-> (context, y) for the U-Net: (negative, prompt) rows when guided (scale > 1), else the prompt's;
        y = pooled + SDXL size embeddings (see ``size_conditioning``)."""
        import numpy as np

        if guidance_scale > 1.0:
            context, pooled = self.encode([negative_prompt, prompt], [negative_prompt, prompt2])
        else:
            context, pooled = self.encode([prompt], [prompt2])
        if self.one_shot:
            self.release_text_encoders()
        # 256 sinusoids per size value in SDXL; tiny models of the same topology may use fewer
        size_emb = size_conditioning(width, height, original_size, crop, target_size,
                                     (self.size_embedding_total - pooled.shape[-1]) // 6)
        y = np.concatenate([pooled, np.repeat(size_emb, pooled.shape[0], 0)], -1).astype(np.float32)
        return context, y

    def latent_shape(self, width, height):
        return (self.latent_channels, height // self.vae_factor, width // self.vae_factor)

    def denoiser(self, guided):
        if self.unet is None:
            raise RuntimeError("the U-Net was released (one_shot Generator)")
        if guided not in self._denoisers:
            if self.segmented:
                self._denoisers[guided] = SegmentedDenoise(self.unet, guided, self.dtype)
            else:
                self._denoisers[guided] = Denoise(self.unet, guided, self.dtype)
        return self._denoisers[guided]

    def sample(self, noise, scheduler, steps, context, y, guidance_scale, rng=None, callback=None, progress=True):
        """Sampling from unscaled ``noise`` (1,4,h,w) with any ``library.sdxl_schedulers`` scheduler (it supplies
        the timesteps, ``init_noise_sigma``, the model-input scale and the step); returns final latents
        (numpy float32). One U-Net evaluation per entry of ``scheduler.timesteps``, ``i`` its position: the
        second-order samplers (heun, dpm_2, dpm_2_a, pndm) list more entries than ``steps`` and keep their
        half-step state themselves, as in diffusers' pipelines. ``callback(i, latents)`` runs after
        evaluation i; when it returns True sampling stops there (as diffusers' ``callback_on_step_end`` with
        ``interrupt``). ``progress``: a tqdm bar per denoising step
        on stderr (a full-size image on CPU takes minutes per step; without it the run looks hung)."""
        import numpy as np
        from tqdm import tqdm

        ms = self.ms
        guided = guidance_scale > 1.0
        sequential = guided and self.sequential_guidance
        scheduler.set_timesteps(steps)
        latents = (np.asarray(noise, np.float32) * scheduler.init_noise_sigma).astype(np.float32)
        step_cell = self.denoiser(guided and not sequential)
        batch = 2 if guided and not sequential else 1
        rows = [(ms.Tensor(context[j:j + 1]), ms.Tensor(y[j:j + 1])) for j in (0, 1)] if sequential else \
            [(ms.Tensor(context), ms.Tensor(y))]
        scale_t = ms.Tensor(np.float32(guidance_scale))
        bar = tqdm(total=len(scheduler.timesteps), desc="denoising", unit="step", leave=False, disable=not progress,
                   dynamic_ncols=True)
        try:
            for i, t in enumerate(scheduler.timesteps):
                x = (ms.Tensor(latents), ms.Tensor(scheduler.input_scale(i)),
                     ms.Tensor(np.full((batch,), t, np.float32)))
                if sequential:  # (negative, prompt) one U-Net call each: half the activation memory
                    uncond, cond = (step_cell(*x, c, yy, scale_t).asnumpy() for c, yy in rows)
                    eps = uncond + np.float32(guidance_scale) * (cond - uncond)
                else:
                    eps = step_cell(*x, *rows[0], scale_t).asnumpy()
                latents = scheduler.step(eps, i, latents, rng)
                bar.update(1)
                if callback is not None and callback(i, latents):
                    break
        finally:
            bar.close()
        return latents

    def decode(self, latents):
        """Latents -> float pixels in [0, 1], (H, W, 3), as diffusers' output_type='np'."""
        import numpy as np

        z = self.ms.Tensor((latents / np.float32(self.vae.scaling_factor)).astype(np.float32))
        image = self.vae_decode(z.astype(self.vae_dtype)).astype(self.ms.float32).asnumpy()[0]
        return np.clip(image / 2 + 0.5, 0, 1).transpose(1, 2, 0)


def size_conditioning(width, height, original_size=None, crop=(0, 0), target_size=None, dim=256):
    """SDXL's size embeddings (1, 6*dim): original and target size default to (height, width)."""
    import numpy as np

    from library.sdxl_original_unet import get_size_embeddings

    original = original_size or (height, width)
    target = target_size or (height, width)
    return get_size_embeddings(np.array([original], np.float32), np.array([crop], np.float32),
                               np.array([target], np.float32), dim).astype(np.float32)


def save_png(output_dir, name, pixels, info):
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = os.path.join(output_dir, name + ".png")
    k = 1
    while os.path.exists(path):  # same second in --interactive mode: never overwrite
        path = os.path.join(output_dir, f"{name}_{k}.png")
        k += 1
    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(key, str(value))
    image = Image.fromarray((pixels * 255).round().astype(np.uint8))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=meta))
    return path
