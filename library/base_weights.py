"""kohya's --base_weights: LoRA files merged into the models' weights before training (checked at start,
merged after the checkpoint load)."""
import logging

from library.device_utils import UserError

logger = logging.getLogger("train_network")  # the trainer's messages keep the name users see


def check_base_weights(args):
    """--base_weights / --base_weights_multiplier at start: each file exists and holds tensors (whether it fits
    the model is known once the model is loaded: ``merge_base_weights``)."""
    from library.lora_file import load_state_dict_file

    files, multipliers = args.base_weights or [], args.base_weights_multiplier or []
    if multipliers and not files:
        raise UserError("--base_weights_multiplier needs --base_weights (the LoRA files it scales)")
    if len(multipliers) > len(files):  # kohya ignores the extra ones silently
        raise UserError(f"--base_weights_multiplier has {len(multipliers)} values for {len(files)} --base_weights "
                        "file(s): give at most one per file (1 for the files it does not reach)")
    for path in files:
        try:
            tensors = load_state_dict_file(path)[0]
        except UserError as e:
            raise UserError(f"--base_weights {e}") from None
        if not tensors:
            raise UserError(f"--base_weights {path}: holds no tensors")


def merge_base_weights(files, multipliers, text_encoders, vae, unet):
    """kohya's --base_weights: each LoRA file merged into the models' weights (W += multiplier * up@down *
    alpha/dim, the inference merge of ``networks.lora``; a LoHa file through ``networks.loha``), with
    ``multipliers[i]``, or 1 where the list does not reach. Every file is checked against the models before
    the first is merged, so a file that does not fit stops the run with the models untouched."""
    from networks.network_base import create_network_from_weights_file as create_network_from_weights

    multipliers = list(multipliers or [])
    todo = []
    for i, path in enumerate(files):
        multiplier = float(multipliers[i]) if i < len(multipliers) else 1.0
        try:
            network, weights_sd = create_network_from_weights(multiplier, path, vae, list(text_encoders), unet,
                                                              for_inference=True)
        except UserError as e:
            raise UserError(f"--base_weights {e}") from None
        todo.append((path, multiplier, network, weights_sd))
    for path, multiplier, network, weights_sd in todo:
        logger.info("merging module: %s with multiplier %s", path, multiplier)
        network.merge_to(list(text_encoders), unet, weights_sd)
    logger.info("all weights merged: %s", ", ".join(files))
