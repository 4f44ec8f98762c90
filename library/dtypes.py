"""Precision names: the spellings kohya's arguments accept, and what each is in MindSpore and safetensors."""

# kohya's --save_precision / --mixed_precision spellings (and torch's / numpy's names) -> canonical
DTYPE_ALIASES = {"float": "fp32", "float32": "fp32", "fp32": "fp32",
                 "fp16": "fp16", "float16": "fp16", "half": "fp16",
                 "bf16": "bf16", "bfloat16": "bf16"}
SAFETENSORS_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def canonical(name):
    """'fp32' | 'fp16' | 'bf16' for any accepted spelling (also 'mindspore.float16', 'torch.bfloat16'),
    None for an unknown one."""
    return DTYPE_ALIASES.get(str(name).lower().replace("mindspore.", "").replace("torch.", ""))


def ms_dtype(name):
    """The MindSpore dtype of a precision name (imported late: ``library.device_utils`` uses this module
    before MindSpore may load)."""
    import mindspore as ms

    return {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[canonical(name)]
