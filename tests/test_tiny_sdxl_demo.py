"""The README's first command: the tiny end-to-end SDXL run writes a real PNG;
user errors print one line and exit non-zero without writing anything."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "tools", "tiny_sdxl_demo.py")


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_demo_writes_png(tmp_path):
    out = tmp_path / "demo.png"
    r = _run("--steps", "2", "--size", "64", "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 0  # decoded from latents, not a blank fill
    assert not any(p.name.endswith(".tmp.png") for p in tmp_path.iterdir())


def test_demo_user_errors_are_one_line(tmp_path):
    out = tmp_path / "x.png"
    for args, message in ((("--device_target", "TPU"), "unknown --device_target 'TPU'"),
                          (("--dtype", "bf16"), "bf16 is not supported on CPU"),
                          (("--size", "50"), "not a positive multiple of 32")):
        r = _run(*args, "--output", str(out))
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r.stderr[-2000:])
    assert not out.exists()
