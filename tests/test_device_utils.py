"""Device/runtime setup: the CPU ISA env var, target resolution and one-line user errors."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from library import device_utils
from library.device_utils import DeviceError


def _python(code, env_overrides=None, unset=()):
    env = dict(os.environ)
    for key in unset:
        env.pop(key, None)
    env.update(env_overrides or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cpu_isa_cap_set_before_mindspore_loads():
    r = _python("import os, library, mindspore; print(os.environ['ONEDNN_MAX_CPU_ISA'])",
                unset=("ONEDNN_MAX_CPU_ISA",))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "AVX2"


def test_cpu_isa_user_value_is_kept():
    r = _python("import os, library; print(os.environ['ONEDNN_MAX_CPU_ISA'])",
                env_overrides={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
    assert r.stdout.strip().splitlines()[-1] == "AVX512_CORE"


def test_resolve_targets():
    assert device_utils.resolve_device_target("auto") in ("Ascend", "GPU", "CPU")
    assert device_utils.resolve_device_target("cpu") == "CPU"
    with pytest.raises(DeviceError, match="unknown --device_target 'TPU'"):
        device_utils.resolve_device_target("TPU")
    if "Ascend" not in device_utils.available_targets():
        with pytest.raises(DeviceError, match="not available"):
            device_utils.resolve_device_target("Ascend")


def test_bf16_on_cpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="bf16 is not supported on CPU"):
        device_utils.check_dtype_supported("bf16", "CPU")
    assert device_utils.check_dtype_supported("float", "CPU") == "fp32"
    assert device_utils.check_dtype_supported("fp16", "CPU") == "fp16"
    assert device_utils.check_dtype_supported("bf16", "Ascend") == "bf16"


def test_setup_device_modes():
    import mindspore as ms

    assert device_utils.setup_device("CPU", pynative=True) == "CPU"
    assert ms.get_context("mode") == ms.PYNATIVE_MODE
    assert device_utils.setup_device("auto") in ("Ascend", "GPU", "CPU")
    assert ms.get_context("mode") == ms.GRAPH_MODE
    with pytest.raises(DeviceError, match="jit_level"):
        device_utils.setup_device("CPU", jit_level="O9")
