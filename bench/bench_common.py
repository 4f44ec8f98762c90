"""Shared pieces of the bench scripts: each measurement runs as a worker process of the
script itself (so peak RSS is its own) and prints one ``RESULT <json>`` line."""
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from library import device_utils  # noqa: E402  (no mindspore import: /proc readers)


def rss_gb():
    """This process's resident memory now."""
    return device_utils.rss_gb() or 0.0


def peak_rss_gb():
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: on Linux a child starts with its parent's
    ``ru_maxrss`` at fork, so a small worker of a large parent would report the parent's peak."""
    peak = device_utils.peak_rss_gb()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def run_worker(script, args, env=None):
    """Run ``script --worker ...`` in a new process; its RESULT dict, or {"error": ...}."""
    proc = subprocess.run([sys.executable, os.path.abspath(script)] + list(args), capture_output=True,
                          text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        return {"error": f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def ensure_sdxl_file(path, generate, parser):
    """Write a random SDXL-shaped SAI file (fp16, ~7 GB, streamed) at ``path`` when it is missing and
    ``generate`` is set; otherwise a missing file is a usage error."""
    if os.path.exists(path):
        return
    if not generate:
        parser.error(f"{path} not found (pass --generate to write a random SDXL-shaped file)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tests"))
    import library  # noqa: F401
    import sdxl_checkpoint_helpers as H

    t0 = time.time()
    H.write_full_size_sai(path)
    print(f"generated {path} in {time.time() - t0:.0f} s")
