"""Backpack GPT-2 vs GPT-2: speed and memory, side by side in one run.

    python bench/run.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                        [--config tiny|micro|mini|small] [--attn sdpa|eager|flash_attention_2]
                        [--data wiki|lee|embedded|random] [--sections ...] [--generate-modes ...]
                        [--size KEY=VALUE ...] [--json OUT.json] [--plot OUT.png]

Measures forward and training-step time against the matched `GPT2LMHeadModel` (eager; the trainer's own step,
eager and compiled as its `--compile true` does), greedy generation (the default cache against GPT-2's
`generate`, the published code's no-cache loop, a static cache with and without
`torch.compile(mode="reduce-overhead", fullgraph=True)`), per-token decoding latency at two positions,
training-step peak memory of the fused vs materialised sense sum, the FLOPs per token of one optimizer step of the
trainer (`train_cost`, counted on the meta device), and on CUDA the model FLOP utilisation and the paper's Table 7.
Writes every raw timing and the headline ratios to JSON (after every section, so a run cut short keeps what it
measured) and prints a markdown table. Targets are reported, never enforced.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import transformers
from tqdm import tqdm

from backpack.files import write_json_atomically
from backpack.loading import count_parameters
from backpack_bench.configs import MODEL_SIZES, BenchSizes, build_models, default_sizes, meta_models
from backpack_bench.data import DATA_SOURCES, TokenBatches
from backpack_bench.measure import (
    COMPILE_BACKENDS,
    GENERATE_MODES,
    bench_forward,
    bench_generate,
    bench_latency,
    bench_mfu,
    bench_table7,
    bench_train_compiled,
    bench_train_cost,
    bench_train_step,
    bench_trainer_step,
)
from backpack_bench.memory import bench_memory
from backpack_bench.report import (
    MET_LEGEND,
    RATIO_KEYS,
    TARGETS,
    headline_ratios,
    markdown_table,
    plot_ratios,
    target_met,
)
from configuration_backpack_gpt2 import GPT2_PADDED_VOCAB_SIZE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALL_SECTIONS = ("forward", "train", "trainer", "train_compiled", "generate", "latency", "memory", "mfu", "table7",
                "train_cost")
# Compiling on a CPU takes minutes: train_compiled runs on CUDA by default.
CPU_SECTIONS = ("forward", "train", "trainer", "generate", "latency", "memory", "train_cost")
CPU_GENERATE_MODES = ("default", "recompute", "static")
CUDA_GENERATE_MODES = ("default", "recompute", "static", "static_compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (micro; ~6 min on 2 CPU cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--config", choices=tuple(MODEL_SIZES), default="micro")
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa",
                        help="attention implementation of both models")
    parser.add_argument("--data", choices=DATA_SOURCES, default="wiki",
                        help="token ids: real text (gensim's Wikipedia or Lee sample, or both: the trainer's "
                             "embedded corpus) or uniform random; train_cost reads the embedded corpus unless lee "
                             "or random")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of {','.join(ALL_SECTIONS)} (default: all that apply; "
                             "mfu and table7 on CUDA only)")
    parser.add_argument("--json", dest="json_path", default=None, help="write all results here")
    parser.add_argument("--plot", default=None, help="write a PNG chart of the ratios here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU if not in the table")
    parser.add_argument("--no-isolate", action="store_true",
                        help="measure memory in this process instead of one fresh subprocess per case (less clean)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sense-table", action="store_true",
                        help="inference sections read senses from model.precompute_senses()'s table")
    parser.add_argument("--generate-modes", default=None,
                        help=f"comma-separated subset of {','.join(GENERATE_MODES)} (default: "
                             f"{','.join(CPU_GENERATE_MODES)} on CPU, {','.join(CUDA_GENERATE_MODES)} on CUDA)")
    parser.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="inductor",
                        help="torch.compile backend of the compiled sections (eager: checks the graph capture "
                             "only, fast)")
    size_keys = ", ".join(f.name for f in dataclasses.fields(BenchSizes) if f.name != "notes")
    parser.add_argument("--size", action="append", default=[], metavar="KEY=VALUE",
                        help="override one benchmark size, e.g. --size generate_reps=1 --size generate_batches=1,8 "
                             f"(keys: {size_keys})")
    return parser.parse_args(argv)


def override_sizes(sizes: BenchSizes, assignments: Sequence[str]) -> BenchSizes:
    """`sizes` with `KEY=VALUE` assignments applied; values take the type of the field's current value
    (an integer, or a comma-separated tuple)."""
    fields = {f.name for f in dataclasses.fields(BenchSizes)} - {"notes"}
    changes: dict = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise SystemExit(f"--size {assignment!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        current = getattr(sizes, key)
        try:
            if isinstance(current, tuple):
                element = type(current[0]) if current else int
                changes[key] = tuple(element(item.strip()) for item in value.split(",") if item.strip())
                if not changes[key]:
                    raise ValueError("empty list")
            else:
                changes[key] = type(current)(value)
        except ValueError as error:
            raise SystemExit(f"--size {assignment!r}: {error}") from error
        choices, required = BenchSizes.CHOICES.get(key), BenchSizes.REQUIRED.get(key, ())
        if choices is not None and not set(required) <= set(changes[key]) <= set(choices):
            need = f" (with {' and '.join(required)})" if required else ""
            raise SystemExit(f"--size {assignment!r}: choose from {', '.join(choices)}{need}")
        if isinstance(changes[key], int) and changes[key] < (0 if key == "warmup" else 1):
            raise SystemExit(f"--size {assignment!r}: must be {'>= 0' if key == 'warmup' else '>= 1'}")
    if not changes:
        return sizes
    notes = [*sizes.notes, "sizes overridden: " + ", ".join(f"{k}={v}" for k, v in changes.items())]
    return dataclasses.replace(sizes, **changes, notes=notes)


def _chosen(requested: str | None, allowed: Sequence[str], default: tuple[str, ...], what: str) -> tuple[str, ...]:
    """The comma-separated `requested` names (each one of `allowed`), or `default` when none were asked for."""
    if not requested:
        return default
    names = tuple(name.strip() for name in requested.split(",") if name.strip())
    unknown = set(names) - set(allowed)
    if unknown:
        raise SystemExit(f"unknown {what} {sorted(unknown)}; choose from {tuple(allowed)}")
    return names


def chosen_generate_modes(args: argparse.Namespace) -> tuple[str, ...]:
    """Generation variants to run: the requested ones, or the device's default set."""
    default = CUDA_GENERATE_MODES if args.device == "cuda" else CPU_GENERATE_MODES
    return _chosen(args.generate_modes, GENERATE_MODES, default, "generation modes")


def chosen_sections(args: argparse.Namespace) -> tuple[str, ...]:
    """Sections to run: the requested ones, or every one that applies to the device."""
    return _chosen(args.sections, ALL_SECTIONS, ALL_SECTIONS if args.device == "cuda" else CPU_SECTIONS, "sections")


def device_name(device: torch.device) -> str:
    """Human-readable name of the accelerator or CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_revision() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it (None outside a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def progress_total(sections: tuple[str, ...], sizes: BenchSizes, modes: tuple[str, ...] = ("default",)) -> int:
    """Number of progress-bar ticks the run will make."""
    per_section = {
        "forward": sizes.reps,
        "train": sizes.reps,
        "trainer": sizes.reps,
        "train_compiled": sizes.reps,
        "generate": len(sizes.generate_batches) * len(set(modes) - {"recompute"})
        + (len(set(sizes.recompute_batches) & set(sizes.generate_batches)) if "recompute" in modes else 0),
        "latency": 1,
        "memory": len(sizes.memory_seqs) * len(sizes.memory_paths),
        "table7": len(sizes.table7_configs),
    }
    return sum(per_section.get(section, 0) for section in sections)


def with_ratios(results: dict) -> dict:
    """`results` with the headline ratios computed from what has been measured so far."""
    ratios = headline_ratios(results)
    return {**results, **ratios, "ratios": ratios,
            "targets": {key: f"{op} {bound:g}" for key, (op, bound) in TARGETS.items()},
            "targets_met": {key: target_met(key, ratios[key]) for key in RATIO_KEYS}}


def run_metadata(
    args: argparse.Namespace, sizes: BenchSizes, models: tuple[torch.nn.Module, torch.nn.Module],
    data: TokenBatches | None, *, n_positions: int, dtype: torch.dtype, sections: Sequence[str],
    modes: Sequence[str],
) -> dict:
    """What a results file says about its run: machine, library versions, models, data and benchmark sizes."""
    device = torch.device(args.device)
    backpack, gpt2 = models
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git": git_revision(),
        "threads": torch.get_num_threads(),
        "config": args.config,
        "model_size": MODEL_SIZES[args.config],
        "num_senses": backpack.config.num_senses,
        "n_positions": n_positions,
        "parameters": {"backpack": count_parameters(backpack), "gpt2": count_parameters(gpt2)},
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": args.attn,
        "data": args.data,
        "data_note": ("real text: GPT-2 tokens of gensim's shipped sample; the Backpack's sense network runs "
                      "once per distinct token in eager CPU inference and the trainer's step")
        if args.data != "random" else "uniform random token ids",
        "distinct_token_fraction": {
            f"{sizes.forward_batch}x{sizes.seq}": data.distinct_fraction(sizes.forward_batch, sizes.seq)
        } if data is not None else {},
        "quick": args.quick,
        "sense_table": args.sense_table,
        "sizes": sizes.as_dict(),
        "sections": list(sections),
        "generate_modes": list(modes),
        "compile_backend": args.compile_backend,
        "timing": "interleaved repetitions after warm-up, medians compared"
                  + ("; CUDA-synchronised" if device.type == "cuda" else ""),
    }


def run_benchmarks(
    args: argparse.Namespace, sizes: BenchSizes, on_partial: Callable[[dict], None] | None = None
) -> dict:
    """Every requested measurement, in one process, with the headline ratios.

    `on_partial` receives the results (marked `"complete": false`) after every section and every generation
    variant.
    """
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = chosen_sections(args)
    modes = chosen_generate_modes(args)
    n_positions = max(512, sizes.prompt_len + sizes.new_tokens, max(sizes.latency_positions) + 1)
    need_tokens = max(sizes.forward_batch, sizes.train_batch * sizes.train_micro_batches,
                      sizes.table7_batch) * sizes.seq * 2 + 200_000
    if set(sections) <= {"train_cost"}:  # counting alone: it reads its own corpus and needs no weights
        data, (backpack, gpt2) = None, meta_models(args.config, n_positions)
    else:
        data = TokenBatches(args.data, need_tokens, GPT2_PADDED_VOCAB_SIZE, args.seed)
        backpack, gpt2 = build_models(args.config, n_positions, args.attn, device, dtype, args.seed)
    if args.sense_table:
        backpack.precompute_senses()  # training steps (with gradients) still run the sense network

    results: dict = {
        "device": device.type,
        "meta": run_metadata(args, sizes, (backpack, gpt2), data, n_positions=n_positions, dtype=dtype,
                             sections=sections, modes=modes),
    }
    bar = tqdm(total=progress_total(sections, sizes, modes), desc="bench", unit="step", file=sys.stderr)

    def tick() -> None:
        bar.update(1)

    def publish(section: str | None = None, value: dict | None = None) -> None:
        if section is not None:
            results[section] = value
        if on_partial is not None:
            results["meta"]["elapsed_s"] = time.perf_counter() - started
            on_partial({**with_ratios(results), "complete": False})

    steps = {
        "forward": lambda: bench_forward(backpack, gpt2, data, sizes, device, tick),
        "train": lambda: bench_train_step(backpack, gpt2, data, sizes, device, tick),
        "trainer": lambda: bench_trainer_step(backpack, gpt2, data, sizes, device, tick),
        "train_compiled": lambda: bench_train_compiled(backpack, gpt2, data, sizes, device, tick,
                                                       args.compile_backend),
        "generate": lambda: bench_generate(backpack, gpt2, data, sizes, device, tick, modes, args.compile_backend,
                                           lambda partial: publish("generate", partial)),
        "latency": lambda: bench_latency(backpack, gpt2, data, sizes, device, tick),
        "memory": lambda: bench_memory(args.config, sizes.memory_seqs, sizes.memory_batch, args.device,
                                       str(dtype).removeprefix("torch."), args.attn, args.data,
                                       not args.no_isolate, tick, sizes.memory_paths, args.threads),
    }
    # train_cost counts on the meta device, on the trainer's embedded corpus (Wikipedia + Lee) unless --data says
    # lee or random.
    cost_data = args.data if args.data in ("lee", "random") else "embedded"
    steps["train_cost"] = lambda: bench_train_cost(args.config, sizes, cost_data, args.seed)
    result_keys = {"train": "train_step"}
    publish()
    for section in sections:
        if section in steps:
            bar.set_description(f"bench {section}")
            publish(result_keys.get(section, section), steps[section]())
    if "mfu" in sections and ("train_step" in results or "train_compiled" in results):
        publish("mfu", bench_mfu(results, backpack, gpt2, results["meta"]["device_name"], dtype,
                                 args.peak_tflops))
    if "table7" in sections:
        del backpack, gpt2  # make room for the larger sizes
        bar.set_description("bench table7")
        publish("table7", bench_table7(sizes, data, device, dtype, args.attn, tick))
    bar.close()
    results["meta"]["elapsed_s"] = time.perf_counter() - started
    return {**with_ratios(results), "complete": True}


def main(argv: Sequence[str] | None = None, sizes: BenchSizes | None = None) -> dict:
    """Run, print the markdown table, write JSON (and the chart) if asked; returns the results."""
    args = parse_args(argv)
    sizes = override_sizes(sizes or default_sizes(args.quick, args.device), args.size)
    on_partial = (lambda partial: write_json_atomically(args.json_path, partial, indent=1)) if args.json_path else None
    results = run_benchmarks(args, sizes, on_partial)
    meta = results["meta"]
    print(f"\nBackpack-{args.config} vs GPT-2 ({meta['device_name']}, {meta['dtype']}, {meta['attn_implementation']}, "
          f"{meta['threads']} threads, data: {meta['data']}{', --quick' if args.quick else ''}); "
          f"{meta['elapsed_s']:.0f} s\n")
    print(markdown_table(results))
    print(f"\n{MET_LEGEND}")
    for note in sizes.notes:
        print(f"\nNote: {note}")
    if args.json_path:
        write_json_atomically(args.json_path, results, indent=1)
    if args.plot:
        plot_ratios(results["ratios"], args.plot, f"Backpack-{args.config} / GPT-2, {meta['device_name']}")
    return results


def cli(argv: Sequence[str] | None = None) -> int:
    """The `backpack-bench` command: run, print the table, exit 0 (targets are reported, never enforced)."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
