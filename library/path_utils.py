"""Output paths shared by the scripts: checks before any work starts (one clear line) and atomic writes."""
import itertools
import os
import tempfile

from library.device_utils import UserError


def check_input_file(path: str, expected: str = "a file", label: str = ""):
    """One line for a file to read that is missing or a folder; ``label`` (e.g. the option) leads it."""
    where = f"{label} {path}" if label else path
    if not os.path.exists(path):
        raise UserError(f"{where}: file not found")
    if os.path.isdir(path):
        raise UserError(f"{where}: is a folder, expected {expected}")


def check_writable_folder(folder: str, label: str):
    """Raise ``UserError`` unless files can be created in ``folder`` (probed with a temp file,
    which also catches read-only mounts that permission bits do not show)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_test_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{label}: output folder {folder} is not writable ({e.strerror or e})") from None


def check_output_folder(folder: str, label: str):
    """Check, without creating anything, that ``folder`` is or can become a writable folder: it is not a
    regular file, no path component above it is one, and the nearest existing folder is writable. Scripts
    call this before loading models, so a bad path costs seconds, not a model load."""
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{label} {folder}: is a file, not a folder")
    parent = path
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise UserError(f"{label} {folder}: {parent} is a file, so no folder can be created under it")
    check_writable_folder(parent, label)


def make_output_folder(folder: str, label: str):
    """Create ``folder`` (and its parents) for writing; a failure is one line. Returns the folders this call
    created, outermost first, so that a failed run can remove what it left empty."""
    created = []
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        created.insert(0, path)
        up = os.path.dirname(path)
        if up == path:
            break
        path = up
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{label} {folder}: cannot create the folder ({e.strerror or e})") from None
    if not os.path.isdir(folder):
        raise UserError(f"{label} {folder}: is a file, not a folder")
    return created


def remove_empty_folders(folders):
    """Remove the folders ``make_output_folder`` created, innermost first, where they are still empty."""
    for path in reversed(list(folders)):
        try:
            os.rmdir(path)
        except OSError:  # not empty (or gone): keep it
            pass


def output_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 minus the process umask. Temporary files
    (``mkstemp``: 0600) and MindSpore's checkpoint writer (0400) would otherwise pass their own mode on to
    the renamed output, which other users of a shared machine then cannot read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # no /proc (not Linux): read by setting it back at once
    os.umask(mask)
    return 0o666 & ~mask


_TMP_SERIAL = itertools.count()


def atomic_write(path, write):
    """Call ``write(tmp)`` with the name of a new temporary file in ``path``'s folder (``.tmp_<name>.<pid>.<n>``),
    then give it the ordinary file mode (``output_file_mode``) and rename it to ``path``: a failure never leaves
    a half-written file under the final name, and the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: output folder {folder} does not exist")
    tmp = os.path.join(folder, f".tmp_{os.path.basename(path)}.{os.getpid()}.{next(_TMP_SERIAL)}")
    try:
        write(tmp)
        os.chmod(tmp, output_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text: str):
    """``atomic_write`` of a UTF-8 text file (csv, json)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    atomic_write(path, write)
