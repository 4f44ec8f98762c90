"""kohya sd-scripts SDXL LoRA port for MindSpore.

Importing this package sets the CPU runtime environment before MindSpore is
loaded (see ``library.device_utils.prepare_environment``), so scripts import
``library`` before ``mindspore``.
"""
from library.device_utils import prepare_environment

prepare_environment()
