"""Training state for ``--save_state`` / ``--resume`` (kohya's accelerate state folders).

A state folder (kohya's names: ``<output_name>-step00000300-state``,
``<output_name>-000002-state``, ``<output_name>-state``) holds:

``weights.safetensors``  every trainable LoRA parameter and the optimizer's state
                         parameters (moments, step count, group lrs), fp32, by name;
``train_state.json``     kohya's ``current_step``/``current_epoch``, plus what an exact
                         continuation needs: the batch position inside the epoch, the
                         trainer's random generators (noise/timesteps numpy Generator,
                         VAE posterior sampling, Python's ``random``, numpy's global
                         state) and the loss history (CSV / curve cover the whole run).

States are taken at update boundaries (gradient-accumulation buffers are zero there),
so a resumed run draws the same batches, noise and timesteps as the uninterrupted one.
The folder is written under a temporary name and renamed: a killed run never leaves a
half-written state under the final name.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np

from library.device_utils import UserError

WEIGHTS_NAME = "weights.safetensors"
STATE_NAME = "train_state.json"
FORMAT_VERSION = 1

EPOCH_STATE_NAME = "{}-{:06d}-state"
STEP_STATE_NAME = "{}-step{:08d}-state"
LAST_STATE_NAME = "{}-state"


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _from_json(x):
    if isinstance(x, dict):
        if "__ndarray__" in x:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def capture_rng(generators: dict) -> dict:
    """States of the named numpy Generators plus Python's and numpy's global generators."""
    py = random.getstate()
    legacy = np.random.get_state()
    return {
        "generators": {name: g.bit_generator.state for name, g in generators.items() if g is not None},
        "python_random": [py[0], list(py[1]), py[2]],
        "numpy_global": list(legacy),
    }


def restore_rng(state: dict, generators: dict):
    for name, g in generators.items():
        if g is not None and name in state["generators"]:
            g.bit_generator.state = state["generators"][name]
    py = state["python_random"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    legacy = state["numpy_global"]
    np.random.set_state((legacy[0], np.asarray(legacy[1], np.uint32), legacy[2], legacy[3], legacy[4]))


def save_state(folder: str, parameters, train_state: dict):
    """Write ``parameters`` (mindspore Parameters, unique names) and ``train_state`` to ``folder``."""
    from safetensors.numpy import save_file

    names = [p.name for p in parameters]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RuntimeError(f"state parameters with the same name: {dup[:5]}")
    parent = os.path.dirname(os.path.abspath(folder))
    tmp = os.path.join(parent, f".tmp_{os.path.basename(folder)}.{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        tensors = {p.name: np.array(p.asnumpy(), np.float32, order="C") for p in parameters}  # keeps 0-d
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME))
        body = dict(train_state, format_version=FORMAT_VERSION)
        with open(os.path.join(tmp, STATE_NAME), "w", encoding="utf-8") as f:
            json.dump(_jsonable(body), f)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_state(folder: str) -> dict:
    """The ``train_state.json`` of a state folder (UserError naming the folder if it is not one)."""
    if not os.path.isdir(folder):
        raise UserError(f"--resume {folder}: state folder not found")
    path = os.path.join(folder, STATE_NAME)
    if not os.path.exists(path) or not os.path.exists(os.path.join(folder, WEIGHTS_NAME)):
        raise UserError(f"--resume {folder}: not a training state folder (needs {STATE_NAME} and {WEIGHTS_NAME}; "
                        "states are written with --save_state)")
    try:
        with open(path, encoding="utf-8") as f:
            state = _from_json(json.load(f))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the training state: {e}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: state format {state.get('format_version')} is not {FORMAT_VERSION}")
    return state


def load_parameters(folder: str, parameters):
    """Set ``parameters`` from the state folder; every one must be there with its shape."""
    from mindspore import Tensor
    from safetensors.numpy import load_file

    path = os.path.join(folder, WEIGHTS_NAME)
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001  (safetensors raises several types for corrupt files)
        raise UserError(f"{path}: cannot read the state weights: {e}") from None
    missing = [p.name for p in parameters if p.name not in tensors]
    if missing:
        raise UserError(f"--resume {folder}: the state does not fit this run: {len(missing)} parameter(s) missing, "
                        f"e.g. {missing[0]} (same network, optimizer and models as the saved run?)")
    for p in parameters:
        value = tensors[p.name]
        if tuple(value.shape) != tuple(p.shape):
            raise UserError(f"--resume {folder}: {p.name} has shape {tuple(value.shape)} in the state, "
                            f"{tuple(p.shape)} in this run")
        p.set_data(Tensor(value.astype(np.float32)).astype(p.dtype))
    unused = len(tensors) - len(parameters)
    return unused


def remove_state(folder: str):
    if os.path.isdir(folder):
        shutil.rmtree(folder)


def optimizer_state_parameters(optimizer, trained_params):
    """The optimizer's own Parameters (moments, step count, lrs): its ``state_parameters()``, or every
    Parameter of the optimizer cell that is not a trained one."""
    if hasattr(optimizer, "state_parameters"):
        return list(optimizer.state_parameters())
    trained = {id(p) for p in trained_params}
    return [p for p in optimizer.get_parameters() if id(p) not in trained]
