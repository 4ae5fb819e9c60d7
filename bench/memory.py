"""Peak memory of one training step: the Backpack's fused sense sum vs the materialised one (and GPT-2).

Fused = the default path (`scaled_dot_product_attention` with the senses as values; on a CPU, for an unpadded batch,
the blockwise causal sum `BlockwiseCausalSenseSum`, which keeps one block of queries' α at a time): no (batch, senses,
seq, seq) tensor. Materialised = the same model called with `output_contextualization=True`, which computes α
(batch, senses, query, key) and α @ C; the GPT-2 stack stays on sdpa in both, so only the sense sum differs.

CPU: each case runs in a fresh subprocess (so one case's allocator state cannot leak into another) with
`MALLOC_MMAP_THRESHOLD_` fixed, so that large blocks are returned to the OS when freed and the resident set
follows live memory; the heap's free pages are handed back (`malloc_trim`) just before the measured step, so that
freed blocks still resident cannot hide the step's growth. The high-water mark `VmHWM` is reset
(`/proc/self/clear_refs`) just before the measured step; "step peak" is that high-water mark minus the resident set
just before the step (weights and AdamW state, after a warm-up step). CUDA: `torch.cuda.max_memory_allocated` after
`reset_peak_memory_stats`, minus `memory_allocated` before the step.

Run as a script, it measures one case given as JSON and prints the result as JSON on its last line.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch

MEMORY_PATHS = ("fused", "materialized", "gpt2")


def _proc_status_kib(field: str) -> int | None:
    """A `VmXXX:` field of /proc/self/status in KiB (None off Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_rss_peak() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _glibc():
    """The C library's handle when it is glibc (its malloc tunables below), else None."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def fix_malloc_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Make glibc serve blocks above `threshold` with mmap and unmap them on free (no dynamic threshold).

    Freed activations then leave the resident set at once, so it follows live memory. False off glibc.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`), so that the resident set is live memory.

    Blocks freed before the fixed mmap threshold took effect (or by an earlier step of this process) stay in the
    heap, resident: a step that reuses them does not grow the resident set, and its peak would read as 0 when
    measured in-process. False off glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def current_rss_bytes() -> int:
    """Resident set size now."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Resident-set high-water mark (since the last reset, or since the process started)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_step_peak(
    config: str, seq: int, batch: int, path: str, device: str = "cpu", dtype: str = "float32",
    attn: str = "sdpa", data: str = "wiki", seed: int = 0, threads: int | None = None,
) -> dict:
    """Peak memory of one training step of one model (`path` in MEMORY_PATHS), measured in this process."""
    from transformers import GPT2LMHeadModel

    from backpack_bench.configs import backpack_config, gpt2_config
    from backpack_bench.data import TokenBatches
    from backpack_bench.measure import make_optimizer, train_step
    from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

    torch_device, torch_dtype = torch.device(device), getattr(torch, dtype)
    if threads:
        torch.set_num_threads(threads)
    if torch_device.type == "cpu":
        fix_malloc_mmap_threshold()
    torch.manual_seed(seed)
    n_positions = max(512, seq)
    if path == "gpt2":
        model = GPT2LMHeadModel(gpt2_config(config, n_positions, attn))
    else:
        model = BackpackGPT2LMHeadModel(backpack_config(config, n_positions, attn))
    model = model.to(device=torch_device, dtype=torch_dtype)
    kwargs = {"output_contextualization": True} if path == "materialized" else {}
    ids = TokenBatches(data, batch * seq, model.config.vocab_size, seed).batch(batch, seq).to(torch_device)
    model.train()
    optimizer = make_optimizer(model)
    train_step(model, optimizer, ids, **kwargs)  # warm-up: allocates the AdamW state
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    result = {"config": config, "seq": seq, "batch": batch, "path": path, "device": device, "dtype": dtype}
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, ids, **kwargs)
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        release_free_heap()
        baseline = current_rss_bytes()
        method = "VmHWM after clear_refs reset" if reset_rss_peak() else "ru_maxrss (process lifetime)"
        train_step(model, optimizer, ids, **kwargs)
        peak = peak_rss_bytes()
    return {**result, "method": method, "baseline_bytes": baseline, "peak_bytes": peak,
            "step_peak_bytes": peak - baseline}


def train_step_peak_isolated(**case) -> dict:
    """`train_step_peak` in a fresh Python process (see the module docstring for why)."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # fixed threshold: big blocks are unmapped on free
    completed = subprocess.run(
        [sys.executable, "-m", "backpack_bench.memory", json.dumps(case)],
        capture_output=True, text=True, env=env, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory case {case} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def bench_memory(
    config: str, seqs: tuple[int, ...], batch: int, device: str, dtype: str, attn: str, data: str,
    isolated: bool, tick, paths: tuple[str, ...] = MEMORY_PATHS, threads: int | None = None,
) -> dict:
    """Training-step peak memory for each sequence length and path; fused/materialised ratios per length."""
    measure = train_step_peak_isolated if isolated else train_step_peak
    results: dict[str, dict] = {}
    for seq in seqs:
        cases: dict = {}
        for path in paths:
            cases[path] = measure(
                config=config, seq=seq, batch=batch, path=path, device=device, dtype=dtype, attn=attn, data=data,
                threads=threads,
            )
            tick()
        for kind in ("step_peak", "peak"):
            fused, materialized = cases["fused"][f"{kind}_bytes"], cases["materialized"][f"{kind}_bytes"]
            # A step too small to grow the resident set at all has no meaningful ratio.
            ratio = fused / materialized if fused > 0 and materialized > 0 else None
            cases[f"ratio_fused_over_materialized_{'step' if kind == 'step_peak' else 'total'}_peak"] = ratio
        results[f"seq{seq}"] = cases
    return {"batch": batch, "isolated_processes": isolated, **results}


if __name__ == "__main__":
    print(json.dumps(train_step_peak(**json.loads(sys.argv[1]))))
