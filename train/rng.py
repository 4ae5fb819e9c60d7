"""Random number generator states of one process, saved as safetensors (tensors + JSON metadata, no pickle).

A resumed run must draw the same dropout masks as an uninterrupted one, so every process saves its torch (CPU
and accelerator), Python and NumPy generator states with each checkpoint. Accelerate's own
``random_states_<i>.pkl`` is a pickle, and ``load_state`` ignores any failure to read it without a word;
this file replaces it: it holds only tensors and a JSON string, and a missing or unreadable one is an error.
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from backpack.files import write_bytes_atomically


def rng_file_name(process_index: int) -> str:
    """The file of one process's states inside a checkpoint."""
    return f"rng_state_{process_index}.safetensors"


def _accelerator_module():
    """``torch.cuda`` / ``torch.xpu`` ... when that device is in use and has per-device generator states."""
    if not torch.accelerator.is_available():
        return None
    module = torch.get_device_module(torch.accelerator.current_accelerator())
    return module if hasattr(module, "get_rng_state_all") else None


def save_rng_state(path: str) -> None:
    """Write this process's generator states to ``path`` (atomically)."""
    python_version, python_keys, python_gauss = random.getstate()
    numpy_name, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python_keys": torch.tensor(python_keys, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
    }
    device_module = _accelerator_module()
    if device_module is not None:
        for index, state in enumerate(device_module.get_rng_state_all()):
            tensors[f"device_{index}"] = state.cpu()
    scalars = {"python_version": python_version, "python_gauss": python_gauss, "numpy_name": numpy_name,
               "numpy_position": int(numpy_position), "numpy_has_gauss": int(numpy_has_gauss),
               "numpy_gauss": float(numpy_gauss)}
    write_bytes_atomically(path, save({name: tensor.contiguous() for name, tensor in tensors.items()},
                                      metadata={"scalars": json.dumps(scalars)}))


def load_rng_state(path: str) -> None:
    """Restore this process's generator states from ``path``.

    Raises:
        ValueError: the file does not hold the states :func:`save_rng_state` writes, or another number of
            accelerator devices than this process has.
    """
    with safe_open(path, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata() or {}
    try:
        scalars = json.loads(metadata["scalars"])
        random.setstate((scalars["python_version"], tuple(int(key) for key in tensors["python_keys"].tolist()),
                         scalars["python_gauss"]))
        np.random.set_state((scalars["numpy_name"], tensors["numpy_keys"].numpy().astype(np.uint32),
                             scalars["numpy_position"], scalars["numpy_has_gauss"], scalars["numpy_gauss"]))
        torch.set_rng_state(tensors["torch"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} does not hold the generator states this trainer saves: {error!r}") from error
    device_states = [tensors[f"device_{index}"] for index in range(len(tensors)) if f"device_{index}" in tensors]
    device_module = _accelerator_module()
    if device_module is not None and device_states:
        if len(device_states) != device_module.device_count():
            raise ValueError(f"{path} holds generator states of {len(device_states)} devices, this process sees "
                             f"{device_module.device_count()}")
        device_module.set_rng_state_all(device_states)
