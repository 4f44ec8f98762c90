"""kohya's ``conditional_loss`` and masked loss as graph-compilable MindSpore ops (the loss cell's
elementwise part). The per-sample huber_c and the latent-size loss mask are computed on the host
(``custom_train_functions.loss_extra_inputs``) and fed to the step, so the graph depends only on
``loss_type``.
"""
from mindspore import ops


def conditional_loss(model_pred, target, loss_type, huber_c):
    """Elementwise loss (kohya's ``conditional_loss(..., reduction="none")``) of (B, C, h, w) tensors.

    l2: (p - t)^2; l1: |p - t|; huber: 2 c (sqrt((p - t)^2 + c^2) - c); smooth_l1: 2 (sqrt((p - t)^2 + c^2) - c),
    with c = huber_c (B,) per sample. ``loss_type`` is a Python string (a graph constant)."""
    diff = model_pred - target
    if loss_type == "l2":
        return ops.square(diff)
    if loss_type == "l1":
        return ops.abs(diff)
    c = ops.broadcast_to(huber_c.reshape(-1, 1, 1, 1), diff.shape)
    smooth = 2.0 * (ops.sqrt(ops.square(diff) + ops.square(c)) - c)
    if loss_type == "huber":
        return c * smooth
    return smooth


def masked_per_sample_loss(model_pred, target, loss_type, huber_c, loss_mask):
    """kohya's process_batch up to the per-sample loss: conditional_loss x mask (B, 1, h, w), mean over
    (C, h, w) -> (B,). A mask of ones (no alpha masks) leaves the loss unchanged bit for bit."""
    loss = conditional_loss(model_pred, target, loss_type, huber_c)
    loss = loss * ops.broadcast_to(loss_mask, loss.shape)
    return ops.mean(loss, (1, 2, 3))
