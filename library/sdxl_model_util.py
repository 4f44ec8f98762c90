"""SDXL model utilities (kohya's names): checkpoint loading/saving and state-dict layout conversion.

``load_models_from_sdxl_checkpoint``, ``load_unet_from_sdxl_checkpoint``, ``save_stable_diffusion_checkpoint``,
``load_vae`` and ``CheckpointInfo`` live in ``library.sdxl_checkpoint`` (key
maps and shape-inferred configs in ``library.sdxl_checkpoint_keys``, file I/O
in ``library.safetensors_io``), the U-Net key conversion between diffusers'
and the SAI/SGM layout in ``library.sdxl_unet_keys``; all are re-exported here.
"""
from library.autoencoder_kl import VAE_SCALE_FACTOR  # noqa: F401
from library.sdxl_checkpoint import (  # noqa: F401
    CheckpointInfo,
    load_models_from_sdxl_checkpoint,
    load_unet_from_sdxl_checkpoint,
    load_vae,
    save_stable_diffusion_checkpoint,
)
from library.sdxl_unet_keys import (  # noqa: F401
    convert_diffusers_unet_state_dict_to_sdxl,
    convert_sdxl_unet_state_dict_to_diffusers,
)

MODEL_VERSION_SDXL_BASE_V1_0 = "sdxl_base_v1-0"

