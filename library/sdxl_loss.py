"""The SDXL training loss as a graph-compilable cell (``sdxl_train_network.make_sdxl_loss_net`` builds it):
conditioning (text encoders or their cached outputs, size embeddings, noisy latents), the U-Net, kohya's loss
formulas; also as a chain of segments for gradient checkpointing (``SdxlNetworkLoss.segments``)."""
import mindspore as ms
from mindspore import nn, ops

from library.sdxl_train_util import get_hidden_states_sdxl
from library.train_losses import masked_per_sample_loss


class SdxlNetworkLoss(nn.Cell):
    """One SDXL training loss (kohya's train_network step for SDXL), graph-compilable.

    Inputs: latents (B,4,h,w) already x0.13025; noise (target noise), noisy_noise (the noise
    mixed into the latents: noise, or noise + ip_noise_gamma * N(0,1)); timesteps float (B,);
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar (B,); weights (B,) (loss_weights x SNR-type
    factors); input_ids1, input_ids2 (B, n, 77) int32, or with cached text encoder outputs the
    context (B, T, 2048) and pool2 (B, 1280); size_emb (B, 1536); huber_c (B,) and
    loss_mask (B, 1, h, w) (``custom_train_functions.loss_extra_inputs``).
    loss = mean_b(weights_b * mean_chw(loss_mask * conditional_loss(pred, target))), target = noise or v.
    ``segments()`` is the same loss as a ``SegmentChain`` over ``input_names`` (gradient checkpointing).
    """
    input_names = ("latents", "noise", "noisy_noise", "timesteps", "sqrt_ab", "sqrt_1mab", "weights",
                   "input_ids1", "input_ids2", "size_emb", "huber_c", "loss_mask")

    def __init__(self, text_encoder1, text_encoder2, unet, max_token_length=None, v_parameterization=False,
                 eos_token_id2=49407, loss_type="l2"):
        super().__init__(auto_prefix=False)
        self.cached_text_encoder_outputs = text_encoder1 is None
        if not self.cached_text_encoder_outputs:
            self.text_encoder1 = text_encoder1
            self.text_encoder2 = text_encoder2
        self.unet = unet
        self.unet_dtype = unet.compute_dtype  # fp16/bf16 with --mixed_precision: the U-Net computes in it
        self.max_token_length = max_token_length
        self.v_parameterization = v_parameterization
        self.eos_token_id2 = eos_token_id2
        self.loss_type = loss_type

    def conditioning(self, latents, noisy_noise, sqrt_ab, sqrt_1mab, input_ids1, input_ids2, size_emb,
                     token_weights1=None, token_weights2=None):
        """(noisy latents in the U-Net's dtype, context, y): what the U-Net is called with."""
        if self.cached_text_encoder_outputs:  # input_ids1: context (B, T, 2048), input_ids2: pool2
            context, pool2 = input_ids1.astype(self.unet_dtype), input_ids2
        else:
            hidden1, hidden2, pool2 = get_hidden_states_sdxl(self.max_token_length, input_ids1, input_ids2,
                                                             None, None, self.text_encoder1, self.text_encoder2,
                                                             eos_token_id2=self.eos_token_id2,
                                                             token_weights1=token_weights1,
                                                             token_weights2=token_weights2)
            context = ops.concat((hidden1, hidden2), 2)
        y = ops.concat((pool2.astype(ms.float32), size_emb), 1)
        shape = latents.shape
        a = ops.broadcast_to(sqrt_ab.reshape(-1, 1, 1, 1), shape)
        s = ops.broadcast_to(sqrt_1mab.reshape(-1, 1, 1, 1), shape)
        noisy = a * latents + s * noisy_noise
        return noisy.astype(self.unet_dtype), context, y

    def loss_from_prediction(self, pred, latents, noise, sqrt_ab, sqrt_1mab, weights, huber_c, loss_mask):
        pred = pred.astype(ms.float32)
        if self.v_parameterization:
            shape = latents.shape
            a = ops.broadcast_to(sqrt_ab.reshape(-1, 1, 1, 1), shape)
            s = ops.broadcast_to(sqrt_1mab.reshape(-1, 1, 1, 1), shape)
            target = a * noise - s * latents  # diffusers get_velocity
        else:
            target = noise
        per_sample = masked_per_sample_loss(pred, target, self.loss_type, huber_c, loss_mask)
        return ops.mean(per_sample * weights)

    def construct(self, latents, noise, noisy_noise, timesteps, sqrt_ab, sqrt_1mab, weights, input_ids1,
                  input_ids2, size_emb, huber_c, loss_mask):
        x, context, y = self.conditioning(latents, noisy_noise, sqrt_ab, sqrt_1mab, input_ids1, input_ids2,
                                          size_emb)
        pred = self.unet(x, timesteps, context, y)
        return self.loss_from_prediction(pred, latents, noise, sqrt_ab, sqrt_1mab, weights, huber_c, loss_mask)

    def segments(self):
        """This loss as a ``SegmentChain`` (gradient checkpointing by the program): the conditioning
        (with the text encoders when they are not cached: one segment), the U-Net's blocks, the loss."""
        from library.segments import Segment
        from library.unet_segments import unet_segments

        return ([Segment("conditioning", self._conditioning_cell(), self.conditioning_inputs,
                         ("x", "context", "y"),
                         param_cells=[] if self.cached_text_encoder_outputs else [self.text_encoder1,
                                                                                   self.text_encoder2])]
                + unet_segments(self.unet)
                + [Segment("loss", _Loss(self), ("pred", "latents", "noise", "sqrt_ab", "sqrt_1mab", "weights",
                                                 "huber_c", "loss_mask"), ("loss",), param_cells=[])])

    conditioning_inputs = ("latents", "noisy_noise", "sqrt_ab", "sqrt_1mab", "input_ids1", "input_ids2",
                           "size_emb")

    def _conditioning_cell(self):
        return _Conditioning(self)


class WeightedSdxlNetworkLoss(SdxlNetworkLoss):
    """``--weighted_captions`` with the text encoders in the step: ``SdxlNetworkLoss`` with two more
    inputs, token_weights1/2 (B, T) float32, by which the text encoders' joined hidden states are
    multiplied (``get_hidden_states_sdxl``)."""
    input_names = SdxlNetworkLoss.input_names + ("token_weights1", "token_weights2")
    conditioning_inputs = SdxlNetworkLoss.conditioning_inputs + ("token_weights1", "token_weights2")

    def construct(self, latents, noise, noisy_noise, timesteps, sqrt_ab, sqrt_1mab, weights, input_ids1,
                  input_ids2, size_emb, huber_c, loss_mask, token_weights1, token_weights2):
        x, context, y = self.conditioning(latents, noisy_noise, sqrt_ab, sqrt_1mab, input_ids1, input_ids2,
                                          size_emb, token_weights1, token_weights2)
        pred = self.unet(x, timesteps, context, y)
        return self.loss_from_prediction(pred, latents, noise, sqrt_ab, sqrt_1mab, weights, huber_c, loss_mask)

    def _conditioning_cell(self):
        return _WeightedConditioning(self)


class _Conditioning(nn.Cell):
    def __init__(self, loss_net):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net

    def construct(self, latents, noisy_noise, sqrt_ab, sqrt_1mab, input_ids1, input_ids2, size_emb):
        return self.loss_net.conditioning(latents, noisy_noise, sqrt_ab, sqrt_1mab, input_ids1, input_ids2,
                                          size_emb)


class _WeightedConditioning(nn.Cell):
    def __init__(self, loss_net):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net

    def construct(self, latents, noisy_noise, sqrt_ab, sqrt_1mab, input_ids1, input_ids2, size_emb,
                  token_weights1, token_weights2):
        return self.loss_net.conditioning(latents, noisy_noise, sqrt_ab, sqrt_1mab, input_ids1, input_ids2,
                                          size_emb, token_weights1, token_weights2)


class _Loss(nn.Cell):
    def __init__(self, loss_net):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net

    def construct(self, pred, latents, noise, sqrt_ab, sqrt_1mab, weights, huber_c, loss_mask):
        return self.loss_net.loss_from_prediction(pred, latents, noise, sqrt_ab, sqrt_1mab, weights, huber_c,
                                                  loss_mask)
