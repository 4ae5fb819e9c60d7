"""Trainer runs for the tests, each a separate process forked from a server that has already imported torch and
transformers (multiprocessing's forkserver), so that a run costs its training, not a 7-second import.

``os.kill(SIGKILL)`` ends such a run as ``kill -9`` would, and its exit code is -9.
"""

import multiprocessing
import os
import sys
from pathlib import Path

# 32 dimensions, 2 layers, 32 positions, 8 sequences (256 tokens) per step from 40 documents of the offline corpus.
TINY = ["--config", "nano", "--n_embd", "32", "--n_layer", "2", "--n_head", "2", "--num_senses", "4",
        "--n_positions", "32", "--batch_size", "4", "--tokens_per_step", "256", "--max_documents", "40",
        "--log_interval", "1", "--report_to", "none", "--learning_rate", "1e-2", "--warmup_steps", "2"]


def _trainer_process(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """Body of one forked run: output to ``log_path``, ``env`` set, then train/pretrain.py's command line."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.update(env)
    from backpack_train import pretrain

    sys.exit(pretrain.cli(argv))


class ForkedTrainer:
    """``trainer(argv, fault=None) -> (exit code, output)``: one train/pretrain.py command line per call."""

    def __init__(self, logs: Path):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["backpack_train.pretrain"])
        self.logs = logs
        self.runs = 0

    def start(self, argv: list[str], fault: str | None = None) -> tuple[multiprocessing.Process, Path]:
        """Start a run and return at once: the process, and the file its output goes to."""
        log_path = self.logs / f"run-{self.runs}.log"
        self.runs += 1
        env = {"BACKPACK_FAULT": fault or "", "TOKENIZERS_PARALLELISM": "false"}
        process = self.context.Process(target=_trainer_process, args=(argv, env, str(log_path)))
        process.start()
        return process, log_path

    def __call__(self, argv: list[str], fault: str | None = None, timeout: float = 600) -> tuple[int, str]:
        process, log_path = self.start(argv, fault)
        process.join(timeout=timeout)
        if process.exitcode is None:
            process.kill()
            raise AssertionError(f"run {' '.join(argv)} (fault {fault}) did not finish in {timeout:.0f}s")
        return process.exitcode, log_path.read_text()
