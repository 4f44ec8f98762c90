"""Output-path checks shared by the scripts (one clear line before any work starts)."""
import os
import tempfile

from library.device_utils import UserError


def check_writable_folder(folder: str, label: str):
    """Raise ``UserError`` unless files can be created in ``folder`` (probed with a temp file,
    which also catches read-only mounts that permission bits do not show)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_test_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{label}: output folder {folder} is not writable ({e.strerror or e})") from None
