"""Checkpoints: Accelerate's ``save_state`` / ``load_state`` plus the loop's own position in the run.

``save_state`` already stores the model, optimizer, scheduler, gradient scaler and every process's RNG states;
``TrainingState`` (registered for checkpointing) adds the step and how many micro-batches were consumed, which
is all a resumed run needs to continue with the same data order. Checkpoints live in
``<output_dir>/checkpoints/checkpoint_<i>`` (Accelerate's automatic naming, oldest removed past the limit).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass


@dataclass
class TrainingState:
    """Where the run is: optimizer steps done, micro-batches consumed per process, tokens seen (all processes)."""

    step: int = 0
    micro_batches: int = 0
    tokens: int = 0
    sequences_per_step: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Checkpoint folders of a run, oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := re.fullmatch(r"checkpoint_(\d+)", name))]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint folder that ``--resume`` names: ``latest`` (None if the run has none yet) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
    return resume


def checkpoint_index(path: str) -> int:
    """The ``i`` of ``checkpoint_<i>`` (so that the next automatic checkpoint gets ``i + 1``)."""
    match = re.search(r"checkpoint_(\d+)$", os.path.normpath(path))
    return int(match.group(1)) if match else 0
