"""The device check's summary: every step's numbers in one JSON and one markdown page, with the GPU targets.

    python bench/device_summary.py OUT_DIR [MORE_OUT_DIRS ...] [--out DIR]

Reads what `bench/device_check.sh` wrote step by step (`steps.jsonl`, `env.json`, `golden.json`, `bench_*.json`,
`trainer/*/`), computes the trainer's steady throughput and MFU from its `log_history.jsonl`, compares the numbers
with the thresholds below (here only: the steps report numbers), and writes `summary.json` and `summary.md` to
`--out` (default: the first folder). Several folders (a check run in two calls of the device tool) are merged; a
file found in a later folder replaces the earlier one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from collections.abc import Sequence
from types import SimpleNamespace

from backpack.files import write_json_atomically, write_text_atomically
from backpack_bench.report import TARGETS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BENCH_FILES = ("bench_core", "bench_generate", "bench_train_compiled", "bench_memory")
# Correctness thresholds. fp32: the model tests' tolerance. bf16 / fp16 against fp32 (relative error of the
# logits, max |a - e| / max |e|): about 3x what the fixture gives on a CPU (2.7e-2 and 3.5e-3), since rounding of
# 8 (bf16) or 11 (fp16) mantissa bits through the network is expected, not a bug.
GOLDEN_THRESHOLDS: dict[str, float] = {
    "fp32_logits": 1e-5, "fp32_contextualization": 1e-5, "fp32_senses": 1e-5,
    "bfloat16_vs_fp32": 8e-2, "float16_vs_fp32": 1e-2, "cache_vs_full": 1e-5, "padded_vs_alone": 1e-5,
}
# The GPU targets (bf16, Backpack-Small): (comparison, bound).
# The benchmark's own targets (bench/report.py), plus the trainer's, which only this check measures.
GPU_TARGETS: dict[str, tuple[str, float]] = {
    **{key: TARGETS[key] for key in (
        "generate_ratio_vs_gpt2_tokens_per_s", "generate_ratio_vs_gpt2_tokens_per_s_max_batch",
        "generate_speedup_vs_full_recompute", "static_compiled_ratio_vs_gpt2_default",
        "static_compiled_ratio_vs_gpt2_default_max_batch", "forward_ratio_backpack_over_gpt2",
        "train_step_ratio_backpack_over_gpt2",
    )},
    "trainer_compiled_backpack_mfu": (">=", 0.40),
    "trainer_compiled_tokens_per_s_ratio_backpack_over_gpt2": (">=", 0.85),
}
GRAPH_BREAK = re.compile(r"\[__graph_breaks\] Graph break")
RECOMPILE = re.compile(r"\[__recompiles\] Recompiling function")


def read_json(path: str) -> dict | None:
    """A JSON file's content, or None when it is missing or cut short."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def latest(folders: Sequence[str], relative: str) -> str | None:
    """Path of `relative` in the last folder that has it."""
    paths = [os.path.join(folder, relative) for folder in folders if os.path.exists(os.path.join(folder, relative))]
    return paths[-1] if paths else None


def read_steps(folders: Sequence[str]) -> list[dict]:
    """Every step's status line (`steps.jsonl`), later folders last."""
    steps = []
    for folder in folders:
        try:
            with open(os.path.join(folder, "steps.jsonl")) as handle:
                steps.extend(json.loads(line) for line in handle if line.strip())
        except OSError:
            continue
    return steps


def compare(value: float | None, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value <= bound if op == "<=" else value >= bound


# --- correctness -------------------------------------------------------------------------------------------------


def golden_checks(golden: dict | None) -> list[dict]:
    """One row per correctness number: value, threshold, within."""
    if not golden:
        return []
    rows: list[dict] = []

    def add(name: str, value, threshold: float | None = None, expect: bool | None = None, error: str | None = None):
        within = compare(value, "<=", threshold) if threshold is not None else (
            None if value is None else value == expect)
        rows.append({"check": name, "value": value, "threshold": threshold if expect is None else expect,
                     "within": within, **({"error": error} if error else {})})

    fp32 = golden.get("golden_fp32", {})
    for attn in ("sdpa", "eager"):
        for part in ("logits", "contextualization", "senses"):
            add(f"fp32 {part} vs expected.pt ({attn})", fp32.get(attn, {}).get(part),
                GOLDEN_THRESHOLDS[f"fp32_{part}"], error=fp32.get("error"))
    for dtype in ("bfloat16", "float16"):
        entry = golden.get("low_precision", {}).get(dtype, {})
        add(f"{dtype} logits vs fp32", entry.get("logits_relative_error_vs_fp32"),
            GOLDEN_THRESHOLDS[f"{dtype}_vs_fp32"], error=entry.get("error") or golden.get("low_precision", {}).get(
                "error"))
        rows.append({"check": f"{dtype} top-1 agreement with fp32 (reported only)",
                     "value": entry.get("top1_agreement_with_fp32"), "threshold": None, "within": None})
    cache = golden.get("cache_equals_full", {})
    for key in sorted(k for k in cache if k.endswith("_relative_error")):
        add(f"cached steps vs full forward ({key.removesuffix('_relative_error')})", cache[key],
            GOLDEN_THRESHOLDS["cache_vs_full"])
    if "error" in cache:
        add("cached steps vs full forward", None, GOLDEN_THRESHOLDS["cache_vs_full"], error=cache["error"])
    padded = golden.get("padded_equals_alone", {})
    add("left-padded batch vs rows alone (forward)", padded.get("forward_max_relative_error"),
        GOLDEN_THRESHOLDS["padded_vs_alone"], error=padded.get("error"))
    add("left-padded batch vs rows alone (greedy tokens equal)", padded.get("greedy_tokens_equal_rows_alone"),
        expect=True, error=padded.get("error"))
    static = golden.get("static_cache", {})
    add("static cache vs default cache (greedy tokens equal, padded batch)",
        static.get("greedy_tokens_equal_default_cache"), expect=True, error=static.get("error"))
    return rows


# --- trainer -----------------------------------------------------------------------------------------------------


def trainer_summary(folder: str, peak_tflops: float | None) -> dict:
    """Steady tokens/s (median of the logged windows after the first, which holds compilation and warm-up), MFU,
    and the graph breaks / recompilations the trainer's log shows.

    `mfu` is on the model FLOPs (`training_flops_per_token`: a Backpack's sense network counted on every token, as
    a per-token implementation runs it); `mfu_executed` on the FLOPs the trainer ran, its sense network on the
    words per step it logged (`train/sense_network_words_per_step`, the step's distinct words)."""
    run = read_json(os.path.join(folder, "run.json")) or {}
    entry: dict = {"run": run}
    windows = []
    try:
        with open(os.path.join(folder, "log_history.jsonl")) as handle:
            for line in handle:
                record = json.loads(line)
                if "train/tokens_per_second" in record:
                    windows.append({"step": record["step"], "tokens_per_s": record["train/tokens_per_second"],
                                    "sense_words": record.get("train/sense_network_words_per_step")})
    except (OSError, json.JSONDecodeError) as error:
        entry["error"] = f"no training log: {error}"
    entry["windows"] = windows
    steady = windows[1:] or windows
    entry["steady_windows"] = len(windows[1:])
    entry["tokens_per_s"] = statistics.median(w["tokens_per_s"] for w in steady) if steady else None
    log_path = os.path.join(os.path.dirname(os.path.dirname(folder)), run.get("log", ""))
    if run.get("log") and os.path.isfile(log_path):
        with open(log_path, errors="replace") as handle:
            text = handle.read()
        entry["graph_breaks_logged"] = len(GRAPH_BREAK.findall(text))
        entry["recompilations_logged"] = len(RECOMPILE.findall(text))
    entry["mfu"] = None
    if entry["tokens_per_s"] and run and peak_tflops:
        from backpack_bench.measure import training_flops_per_token

        config = SimpleNamespace(**{key: run[key] for key in ("n_embd", "n_layer", "vocab_size", "num_senses",
                                                              "sense_intermediate_scale")})
        processes = run.get("processes", 1)
        tokens = run["tokens_per_step"] // processes  # one process's step; tokens/s counts every process's
        backpack = run["model"] == "backpack"
        flops_per_token = training_flops_per_token(config, run["seq"], tokens, tokens if backpack else None)
        device_flops = peak_tflops * 1e12 * processes
        entry.update(flops_per_token=flops_per_token, mfu=entry["tokens_per_s"] * flops_per_token / device_flops)
        sense_words = [w["sense_words"] for w in steady if w["sense_words"] is not None]
        if backpack and sense_words:
            words = statistics.median(sense_words)
            executed = training_flops_per_token(config, run["seq"], tokens, words)
            entry.update(sense_network_words_per_step=words, executed_flops_per_token=executed,
                         mfu_executed=entry["tokens_per_s"] * executed / device_flops)
    return entry


# --- everything --------------------------------------------------------------------------------------------------


def summarize(folders: Sequence[str]) -> dict:
    from backpack_bench.measure import peak_tflops

    env = read_json(latest(folders, "env.json") or "") or {}
    devices = env.get("torch", {}).get("devices") or []
    device_name = devices[0]["name"] if devices else env.get("cpu", "unknown")
    summary: dict = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "folders": list(folders),
                     "device": device_name, "env": env, "steps": read_steps(folders)}
    summary["golden"] = golden_checks(read_json(latest(folders, "golden.json") or ""))

    bench: dict = {}
    ratios: dict = {}
    for name in BENCH_FILES:
        results = read_json(latest(folders, f"{name}.json") or "")
        if results is None:
            continue
        bench[name] = results
        ratios.update({key: value for key, value in (results.get("ratios") or {}).items() if value is not None})
    summary["bench_ratios"] = ratios

    trainer: dict = {}
    names = sorted({name for folder in folders if os.path.isdir(os.path.join(folder, "trainer"))
                    for name in os.listdir(os.path.join(folder, "trainer"))})
    for name in names:
        folder = latest(folders, os.path.join("trainer", name))
        run = read_json(os.path.join(folder, "run.json")) or {}
        dtype = "bfloat16" if run.get("mixed_precision") == "bf16" else "float32"
        trainer[name] = trainer_summary(folder, peak_tflops(device_name, _torch_dtype(dtype)))
    summary["trainer"] = trainer
    measured = dict(ratios)
    for mode in ("eager", "compiled"):
        backpack, gpt2 = trainer.get(f"{mode}_backpack", {}), trainer.get(f"{mode}_gpt2", {})
        if backpack.get("tokens_per_s") and gpt2.get("tokens_per_s"):
            measured[f"trainer_{mode}_tokens_per_s_ratio_backpack_over_gpt2"] = (
                backpack["tokens_per_s"] / gpt2["tokens_per_s"])
        if backpack.get("mfu") is not None:
            measured[f"trainer_{mode}_backpack_mfu"] = backpack["mfu"]
        if backpack.get("mfu_executed") is not None:
            measured[f"trainer_{mode}_backpack_mfu_executed"] = backpack["mfu_executed"]
    summary["targets"] = [
        {"target": key, "op": op, "bound": bound, "value": measured.get(key),
         "met": compare(measured.get(key), op, bound)}
        for key, (op, bound) in GPU_TARGETS.items()
    ]
    summary["measured"] = measured
    failed = [step["step"] for step in summary["steps"] if step.get("status") != "ok"]
    done = {step["step"] for step in summary["steps"] if step.get("status") == "ok"}
    summary["rerun_steps"] = [name for name in dict.fromkeys(failed) if name not in done and name != "summary"]
    summary["_bench"] = bench
    return summary


def devices_of(summary: dict) -> list[dict]:
    """The CUDA devices the check ran on (empty on a CPU-only machine)."""
    return summary["env"].get("torch", {}).get("devices") or []


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(summary: dict) -> str:
    """The summary page: steps, correctness, the GPU targets, trainer, and each benchmark's own table."""
    from backpack_bench.report import markdown_table

    env = summary["env"]
    packages = env.get("packages", {})
    lines = [f"# Device check: {summary['device']}", "",
             f"Generated {summary['generated']}; torch {packages.get('torch')}, transformers "
             f"{packages.get('transformers')}, accelerate {packages.get('accelerate')}, flash-attn "
             f"{packages.get('flash-attn') or 'not installed'}.", "",
             "## Steps", "", "| step | status | seconds | time box (s) |", "|---|---|---|---|"]
    for step in summary["steps"]:
        lines.append(f"| {step['step']} | {step.get('status')} | {_fmt(step.get('seconds'))} | "
                     f"{_fmt(step.get('box_s'))} |")
    if summary["rerun_steps"]:
        lines += ["", "Not finished: rerun with `bash bench/device_check.sh --steps "
                  f"{','.join(summary['rerun_steps'])}`."]
    lines += ["", "## Correctness (tiny checkpoint, max |a - e| / max |e|)", "",
              "| check | value | threshold | within |", "|---|---|---|---|"]
    for row in summary["golden"]:
        value = row.get("error", _fmt(row["value"])) if row["value"] is None else _fmt(row["value"])
        lines.append(f"| {row['check']} | {value} | {_fmt(row['threshold'])} | {_fmt(row['within'])} |")
    lines += ["", "## GPU targets", ""]
    if not devices_of(summary):
        lines += ["These targets are for a GPU (bf16, Backpack-Small); this run had no GPU, so the comparison below "
                  "only shows that every number was produced.", ""]
    lines += ["| target | measured | bound | met |", "|---|---|---|---|"]
    for row in summary["targets"]:
        lines.append(f"| {row['target']} | {_fmt(row['value'])} | {row['op']} {row['bound']:g} | "
                     f"{_fmt(row['met'])} |")
    lines += ["", "## Trainer (`train/pretrain.py`)", "",
              "| run | steady tokens/s | MFU | MFU, executed FLOPs | windows after the first | graph breaks logged "
              "| recompilations logged |",
              "|---|---|---|---|---|---|---|"]
    lines.insert(len(lines) - 2, "MFU is on the model FLOPs (a Backpack's sense network counted on every token, as a "
                 "per-token implementation runs it); the executed column counts the sense network on the distinct "
                 "words per step the trainer logged. One recompilation of a compiled run is expected (evaluation "
                 "runs without gradients, training with them); more mean the step recompiles as it goes.\n")
    for name, entry in summary["trainer"].items():
        lines.append(f"| {name} | {_fmt(entry.get('tokens_per_s'))} | {_fmt(entry.get('mfu'))} | "
                     f"{_fmt(entry.get('mfu_executed'))} | "
                     f"{entry.get('steady_windows')} | {_fmt(entry.get('graph_breaks_logged'))} | "
                     f"{_fmt(entry.get('recompilations_logged'))} |")
    for name, results in summary["_bench"].items():
        state = "complete" if results.get("complete") else "cut short (partial results)"
        lines += ["", f"## `bench/run.py`: {name} ({state})", "", markdown_table(results)]
        errors = [f"- {section} {batch} {variant}: {value['error'][:300]}"
                  for section in ("generate",) for batch, entry in (results.get(section) or {}).items()
                  for variant, value in entry.items() if isinstance(value, dict) and "error" in value]
        compiled = results.get("train_compiled") or {}
        for model in ("backpack", "gpt2"):
            failure = compiled.get(f"{model}_compile", {}).get("fullgraph_error")
            if failure:
                errors.append(f"- train_compiled {model}: fullgraph=True failed: {failure[:300]}")
        if errors:
            lines += ["", "Errors recorded instead of numbers:", "", *errors]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="device-check output folders, earliest first")
    parser.add_argument("--out", default=None, help="where summary.json and summary.md go (default: first folder)")
    args = parser.parse_args(argv)
    missing = [folder for folder in args.folders if not os.path.isdir(folder)]
    if missing:
        raise SystemExit(f"not a folder: {', '.join(missing)}")
    summary = summarize(args.folders)
    out = args.out or args.folders[0]
    page = markdown(summary)
    recorded = {key: value for key, value in summary.items() if key != "_bench"}
    write_json_atomically(os.path.join(out, "summary.json"), recorded, indent=1)
    write_text_atomically(os.path.join(out, "summary.md"), page)
    print(page)
    return summary


if __name__ == "__main__":
    main()
