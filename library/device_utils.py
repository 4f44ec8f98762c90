"""Device and runtime setup shared by every script.

``prepare_environment`` must run before ``mindspore`` is imported (the
``library`` package calls it on import): oneDNN reads ``ONEDNN_MAX_CPU_ISA``
once, at load. On AVX-512 CPUs oneDNN falls back to a reference kernel for
3x3 convolutions (two orders of magnitude slower; Limitations.md, "CPU ISA
cap"); capping the ISA at AVX2 restores the fast kernel at the price of part
of the fp32 matmul throughput. A value the user set is
kept. It only affects oneDNN, i.e. CPU kernels, so it is harmless on Ascend.
"""
import argparse
import contextlib
import logging
import os
import sys

from library.dtypes import canonical

logger = logging.getLogger(__name__)

DEVICE_TARGETS = ("auto", "Ascend", "GPU", "CPU")
JIT_LEVELS = ("O0", "O1", "O2")
CPU_ISA_DEFAULT = "AVX2"
# oneDNN ISA caps under which its 3x3 convolution kernel is the fast one
_CONV_FAST_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def prepare_environment():
    """Set process-wide environment variables that must precede the mindspore import."""
    # MindSpore's C++ log level: errors only, unless the user chose one (its
    # warnings about absent Ascend libraries on CPU builds are noise to users).
    os.environ.setdefault("GLOG_v", "3")
    if "ONEDNN_MAX_CPU_ISA" in os.environ:
        return
    if "mindspore" in sys.modules:
        logger.warning(
            "mindspore was imported before library: ONEDNN_MAX_CPU_ISA=%s cannot take effect, "
            "3x3 convolutions on AVX-512 CPUs may be ~100x slower", CPU_ISA_DEFAULT)
    os.environ["ONEDNN_MAX_CPU_ISA"] = CPU_ISA_DEFAULT


def conv_as_matmul() -> bool:
    """Whether convolutions with a kernel larger than 1x1 run as matmul + Col2Im (``library.conv_col2im``):
    on the CPU with oneDNN's ISA not capped at AVX2 or below (set ``ONEDNN_MAX_CPU_ISA=ALL`` before
    starting), where its own 3x3 convolution is the reference kernel."""
    import mindspore as ms

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", CPU_ISA_DEFAULT).upper()
    return isa not in _CONV_FAST_ISAS and ms.get_context("device_target") == "CPU"


class UserError(Exception):
    """An error in what the user asked for (paths, options): printed as one line."""


class DeviceError(UserError):
    """A user-facing device/runtime configuration error (printed as one line)."""


def add_device_arguments(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("device")
    group.add_argument("--device_target", type=str, default="auto",
                       help="auto (Ascend, then GPU, then CPU), Ascend, GPU or CPU")
    group.add_argument("--pynative", action="store_true",
                       help="run in PyNative mode (eager: no compile, each tensor freed when unused), for "
                            "debugging; the default is graph mode (with --gradient_checkpointing, a chain of "
                            "per-layer graphs that fits full-size SDXL on a CPU machine)")
    group.add_argument("--jit_level", type=str, default=None, choices=JIT_LEVELS,
                       help="graph-mode jit level (MindSpore default when unset)")
    group.add_argument("--device_id", type=int, default=None,
                       help="device index (default: DEVICE_ID env or 0)")


def available_targets():
    """Device targets this MindSpore build can run on, in preference order."""
    import mindspore as ms

    found = []
    for target in ("Ascend", "GPU"):
        try:
            if ms.hal.is_available(target):
                found.append(target)
        except Exception:  # backend plugin missing from this build
            pass
    found.append("CPU")
    return found


def resolve_device_target(device_target: str) -> str:
    normalized = {t.lower(): t for t in DEVICE_TARGETS}.get(str(device_target).lower())
    if normalized is None:
        raise DeviceError(
            f"unknown --device_target '{device_target}': choose one of {', '.join(DEVICE_TARGETS)}")
    available = available_targets()
    if normalized == "auto":
        return available[0]
    if normalized not in available:
        raise DeviceError(
            f"--device_target {normalized} is not available in this MindSpore installation "
            f"(available: {', '.join(available)})")
    return normalized


def setup_device(device_target="auto", pynative=False, jit_level=None, device_id=None):
    """Configure MindSpore's context; returns the resolved device target.

    Graph mode is the default (faster than PyNative on CPU; README benchmarks);
    ``pynative=True`` is for debugging.
    """
    prepare_environment()
    import mindspore as ms

    target = resolve_device_target(device_target)
    if jit_level is not None and jit_level not in JIT_LEVELS:
        raise DeviceError(f"unknown --jit_level '{jit_level}': choose one of {', '.join(JIT_LEVELS)}")
    ms.set_device(target, device_id if device_id is not None else int(os.environ.get("DEVICE_ID", 0)))
    ms.set_context(mode=ms.PYNATIVE_MODE if pynative else ms.GRAPH_MODE)
    if jit_level is not None:
        ms.set_context(jit_config={"jit_level": jit_level})
    return target


def setup_device_from_args(args) -> str:
    return setup_device(args.device_target, args.pynative, args.jit_level, args.device_id)


def release_host_memory():
    """Collect garbage and hand freed heap memory back to the system (glibc ``malloc_trim``).

    Model weights are many mid-sized host allocations that glibc keeps in its heap after they are
    freed; the trim gives most of a deleted model's memory back (Limitations.md).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss():
    """Start this process's peak resident memory (VmHWM) anew (Linux), so that ``peak_rss_gb`` measures
    one phase (the training steps, not the checkpoint load before them). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_gb(field):
    """A memory field of /proc/self/status (kB) in GB; None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return None


def rss_gb():
    """This process's resident memory now (VmRSS) in GB; None where there is none."""
    return _status_gb("VmRSS")


def peak_rss_gb():
    """VmHWM in GB (since the start or the last ``reset_peak_rss``); None where there is none."""
    return _status_gb("VmHWM")


@contextlib.contextmanager
def pynative_mode():
    """Run the enclosed calls in PyNative mode, then restore the previous mode.

    For one-off passes over models that are freed afterwards (text encoder output caching): what a
    graph-mode call of a model compiles keeps the model's weights in the backend after the model is
    deleted (Limitations.md: "A model run once in graph mode keeps its memory").
    """
    import mindspore as ms

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)


def check_dtype_supported(dtype_name: str, device_target: str):
    """Stop early for dtypes whose Dense/Conv kernels the device lacks (bf16 on CPU)."""
    name = canonical(dtype_name)
    if name is None:
        raise DeviceError(f"unknown dtype '{dtype_name}': choose fp32, fp16 or bf16")
    if name == "bf16" and device_target == "CPU":
        raise DeviceError("bf16 is not supported on CPU: MindSpore has no bfloat16 Dense/Conv kernels "
                          "for the CPU backend; use fp32 or fp16, or run on Ascend")
    return name


def run_main(main):
    """Run ``main()``; a UserError prints one line and exits with status 2, not a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


