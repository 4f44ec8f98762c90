"""kohya's ``sdxl_train_network.py``: SDXL LoRA training (``SdxlNetworkTrainer``).

    python sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config dataset.toml --network_module networks.lora --network_dim 16 \\
        --learning_rate 1e-4 --max_train_steps 1000 --output_dir out --output_name my_lora

See ``train_network.py`` for the loop and the list of arguments not implemented yet.
"""
import os
import sys
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import library  # noqa: E402,F401  (sets the CPU runtime env before mindspore loads)
import logging  # noqa: E402

import train_network  # noqa: E402
from library.device_utils import UserError, run_main  # noqa: E402

SDXL_MODEL_VERSION = "sdxl_base_v1-0"
logger = logging.getLogger(__name__)


TE2_PARAM_PREFIX = "te2."


def distinguish_text_encoder_params(text_encoder2):
    """Text encoder 1 and 2 have the same (transformers) parameter names; one compiled step and the
    optimizer's state need unique names, so text encoder 2's parameters get a ``te2.`` prefix (names
    only: LoRA files use kohya's module names, not parameter names)."""
    for p in text_encoder2.get_parameters():
        if not p.name.startswith(TE2_PARAM_PREFIX):
            p.name = TE2_PARAM_PREFIX + p.name


def make_sdxl_loss_net(text_encoder1, text_encoder2, unet, max_token_length=None, v_parameterization=False,
                       eos_token_id2=49407, loss_type="l2", weighted_captions=False):
    """The SDXL loss cell of the train step (see ``SdxlNetworkLoss``); text encoders None: it takes
    cached text encoder outputs instead of token ids. ``weighted_captions`` (text encoders given): two
    more inputs, the token weights of the captions (``WeightedSdxlNetworkLoss``)."""
    from library.sdxl_loss import SdxlNetworkLoss, WeightedSdxlNetworkLoss

    cls = WeightedSdxlNetworkLoss if weighted_captions and text_encoder1 is not None else SdxlNetworkLoss
    return cls(text_encoder1, text_encoder2, unet, max_token_length, v_parameterization, eos_token_id2, loss_type)


def make_text_encoder_outputs_fn(text_encoder1, text_encoder2, max_token_length=None, eos_token_id2=49407,
                                 weighted=False):
    """(ids1, ids2) int (B, n, 77) -> float32 numpy (hidden1, hidden2, pool2) as the train step computes them
    (``get_hidden_states_sdxl``): what ``--cache_text_encoder_outputs`` stores. Runs in PyNative mode, so
    that the text encoders' memory is given back when they are dropped (see ``pynative_mode``).
    ``weighted`` (``--weighted_captions``): called as (ids1, ids2, weights1, weights2), the hidden states
    weighted as the train step weights them (kohya caches the weighted outputs)."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn

    from library.device_utils import pynative_mode
    from library.sdxl_train_util import get_hidden_states_sdxl

    class Encode(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.text_encoder1, self.text_encoder2 = text_encoder1, text_encoder2

        def construct(self, ids1, ids2, weights1=None, weights2=None):
            return get_hidden_states_sdxl(max_token_length, ids1, ids2, None, None, self.text_encoder1,
                                          self.text_encoder2, eos_token_id2=eos_token_id2,
                                          token_weights1=weights1, token_weights2=weights2)

    cell = Encode()
    cell.set_train(False)

    def encode(ids1, ids2, weights1=None, weights2=None):
        if weighted != (weights1 is not None):
            raise ValueError("token weights are given if and only if the encoder was made with weighted=True")
        args = [Tensor(np.asarray(ids1, np.int32)), Tensor(np.asarray(ids2, np.int32))]
        if weighted:
            args += [Tensor(np.asarray(weights1, np.float32)), Tensor(np.asarray(weights2, np.float32))]
        with pynative_mode():
            outs = cell(*args)
            return tuple(o.astype(ms.float32).asnumpy() for o in outs)

    return encode


class SdxlStepInputs(NamedTuple):
    """One SDXL train step's inputs by name (``SdxlNetworkTrainer.step_inputs``), as Tensors; what each holds
    is in ``SdxlNetworkLoss``'s docstring. With cached text encoder outputs ``input_ids1``/``input_ids2`` hold
    the context (B, T, 2048) and pool2 (B, 1280); ``token_weights1/2`` only with --weighted_captions and the
    text encoders in the step (else None)."""
    latents: Any
    noise: Any
    noisy_noise: Any
    timesteps: Any
    sqrt_ab: Any
    sqrt_1mab: Any
    weights: Any
    input_ids1: Any
    input_ids2: Any
    size_emb: Any
    huber_c: Any
    loss_mask: Any
    token_weights1: Any = None
    token_weights2: Any = None

    def flat(self, input_names):
        """The compiled cells' positional arguments, in the loss cell's ``input_names`` order: the one place
        the named inputs become a tuple. A name the cell takes that is None here, or an input given that the
        cell does not take, is an error."""
        values = tuple(getattr(self, name) for name in input_names)
        unused = [f for f in self._fields if f not in input_names and getattr(self, f) is not None]
        missing = [name for name, v in zip(input_names, values) if v is None]
        if missing or unused:
            raise ValueError(f"step inputs do not fit the loss cell: missing {missing}, not taken {unused}")
        return values


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    def __init__(self):
        super().__init__()
        from library.sdxl_train_util import VAE_SCALE_FACTOR

        self.vae_scale_factor = VAE_SCALE_FACTOR
        self.is_sdxl = True

    def assert_extra_args(self, args, train_dataset_group):
        from library.custom_train_functions import check_loss_args
        from library.dataset_check import check_weighted_captions

        train_dataset_group.verify_bucket_reso_steps(32)
        check_loss_args(args, train_dataset_group)
        for d in train_dataset_group.datasets:
            if getattr(d, "network_multiplier", 1.0) != 1.0:
                raise UserError("network_multiplier in the dataset config is not implemented yet in this port")
        if args.weighted_captions:  # a bad "(x:1.2.3)" stops the run now, not at the batch that draws it
            check_weighted_captions(train_dataset_group)

    def load_tokenizers(self, args):
        from library.clip_tokenizer import load_tokenizers

        self.tokenizers = load_tokenizers(args.tokenizer_cache_dir)
        return self.tokenizers

    def load_target_model(self, args, with_unet=True):
        from library.sdxl_model_util import load_models_from_sdxl_checkpoint

        te1, te2, vae, unet, _logit_scale, _info = load_models_from_sdxl_checkpoint(
            args.pretrained_model_name_or_path, None, args.vae,
            unet_dtype="fp16" if args.fp16_unet_weights else None, with_unet=with_unet)
        self.text_encoder_widths = (te1.config.hidden_size, te2.config.hidden_size)
        self.pooled_width = te2.config.projection_dim
        if unet is not None:
            self.check_unet_fits(args, unet)
        return SDXL_MODEL_VERSION, [te1, te2], vae, unet

    def load_unet(self, args):
        from library.sdxl_model_util import load_unet_from_sdxl_checkpoint

        unet = load_unet_from_sdxl_checkpoint(args.pretrained_model_name_or_path,
                                              unet_dtype="fp16" if args.fp16_unet_weights else None)
        self.check_unet_fits(args, unet)
        return unet

    def check_unet_fits(self, args, unet):
        if unet.adm_in_channels != self.pooled_width + 6 * 256:
            raise UserError(f"{args.pretrained_model_name_or_path}: UNet adm_in_channels {unet.adm_in_channels} "
                            f"!= text encoder 2 projection {self.pooled_width} + 6*256")

    def cache_text_encoder_outputs(self, args, text_encoders, dataset_groups):
        weighted = bool(args.weighted_captions)  # kohya caches the weighted outputs
        encode = make_text_encoder_outputs_fn(text_encoders[0], text_encoders[1], args.max_token_length,
                                              self.tokenizers[1].eos_token_id, weighted=weighted)
        for group in dataset_groups:
            group.cache_text_encoder_outputs(encode, self.tokenizers, args.max_token_length,
                                             args.cache_text_encoder_outputs_to_disk,
                                             skip_cache_check=args.skip_cache_check, weighted=weighted)

    def build_loss_net(self, args, text_encoders, unet):
        if args.cache_text_encoder_outputs:
            text_encoders = [None, None]
        else:
            distinguish_text_encoder_params(text_encoders[1])
        return make_sdxl_loss_net(text_encoders[0], text_encoders[1], unet, args.max_token_length,
                                  args.v_parameterization, self.tokenizers[1].eos_token_id, args.loss_type,
                                  weighted_captions=args.weighted_captions)

    def step_inputs(self, args, batch, latents, noise, noisy_noise, timesteps, weights, noise_schedule):
        import numpy as np
        from mindspore import Tensor

        from library.custom_train_functions import loss_extra_inputs
        from library.sdxl_train_util import size_embeddings_for_batch

        sqrt_ab, sqrt_1mab = noise_schedule.coefficients(timesteps)
        huber_c, loss_mask = loss_extra_inputs(args, batch, timesteps, noise_schedule, latents.shape)
        token_weights = (None, None)
        if batch.get("text_encoder_outputs_list") is not None:  # cached: context and pool2 in the ids' slots
            hidden1, hidden2, pool2 = batch["text_encoder_outputs_list"]
            text = (Tensor(np.concatenate([hidden1, hidden2], 2).astype(np.float32)),
                    Tensor(np.asarray(pool2, np.float32)))
        elif args.weighted_captions:  # kohya: the batch's (processed) captions tokenised with their weights
            (ids1, ids2), weights12 = self.weighted_tokens(args, batch["captions"])
            text = (Tensor(np.asarray(ids1, np.int32)), Tensor(np.asarray(ids2, np.int32)))
            token_weights = tuple(Tensor(w) for w in weights12)
        else:
            ids1, ids2 = batch["input_ids_list"]
            text = (Tensor(np.asarray(ids1, np.int32)), Tensor(np.asarray(ids2, np.int32)))
        return SdxlStepInputs(
            latents=Tensor(latents), noise=Tensor(noise), noisy_noise=Tensor(noisy_noise),
            timesteps=Tensor(np.asarray(timesteps, np.float32)), sqrt_ab=Tensor(sqrt_ab), sqrt_1mab=Tensor(sqrt_1mab),
            weights=Tensor(weights), input_ids1=text[0], input_ids2=text[1],
            size_emb=Tensor(size_embeddings_for_batch(batch)), huber_c=Tensor(huber_c), loss_mask=Tensor(loss_mask),
            token_weights1=token_weights[0], token_weights2=token_weights[1])

    def weighted_tokens(self, args, captions):
        """--weighted_captions: captions -> ((ids1, ids2), (weights1, weights2)); the first caption that
        carries weights is logged once, with what it was parsed to."""
        from library.prompt_weighting import parse_prompt_attention, tokenize_sdxl_weighted

        if not getattr(self, "_logged_weighted_caption", False):
            for caption in captions:
                pieces = parse_prompt_attention(caption)
                if any(w != 1.0 for _, w in pieces):
                    logger.info("weighted caption: %r -> %s", caption,
                                ", ".join(f"{t!r}: {w:.4g}" for t, w in pieces))
                    self._logged_weighted_caption = True
                    break
        return tokenize_sdxl_weighted(captions, self.tokenizers, args.max_token_length)


def setup_parser():
    return train_network.setup_parser()


def main(argv=None):
    train_network.main(argv, SdxlNetworkTrainer)


if __name__ == "__main__":
    run_main(main)
