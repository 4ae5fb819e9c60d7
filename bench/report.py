"""Headline ratios, targets, the markdown table and the optional chart."""

from __future__ import annotations

# Issue 6's targets: (comparison, bound). Checked in the benchmark only, never in tests or CI.
TARGETS: dict[str, tuple[str, float]] = {
    "forward_ratio_backpack_over_gpt2": ("<=", 1.15),
    "train_step_ratio_backpack_over_gpt2": ("<=", 1.15),
    "generate_speedup_vs_full_recompute": (">=", 20.0),
    "generate_ratio_vs_gpt2_tokens_per_s": (">=", 0.75),
    "latency_ratio_pos512_over_pos64": ("<=", 1.5),
    "peak_mem_ratio_fused_over_materialized": ("<=", 0.6),
}
RATIO_KEYS = tuple(TARGETS)


def _median(entry: dict, name: str) -> float:
    return entry[name]["median_s"]


def headline_ratios(results: dict) -> dict[str, float | None]:
    """The six ratios of issue 6 from the raw results (None where a section was not run).

    Generation ratios are taken at batch 1 (and the full-recompute speedup at the first batch it was run for);
    the memory ratio at the longest sequence, on the step peak (memory the step adds over weights + AdamW state).
    """
    ratios: dict[str, float | None] = dict.fromkeys(RATIO_KEYS)
    if "forward" in results:
        ratios["forward_ratio_backpack_over_gpt2"] = _median(results["forward"], "backpack") / _median(
            results["forward"], "gpt2")
    if "train_step" in results:
        ratios["train_step_ratio_backpack_over_gpt2"] = _median(results["train_step"], "backpack") / _median(
            results["train_step"], "gpt2")
    generate = results.get("generate", {})
    if generate:
        first = next(iter(generate.values()))
        ratios["generate_ratio_vs_gpt2_tokens_per_s"] = (
            first["backpack_cached"]["tokens_per_s"] / first["gpt2_cached"]["tokens_per_s"])
        for entry in generate.values():
            if "backpack_full_recompute" in entry:
                ratios["generate_speedup_vs_full_recompute"] = (
                    _median(entry, "backpack_full_recompute") / _median(entry, "backpack_cached"))
                break
    latency = results.get("latency")
    if latency:
        low, high = latency["positions"]
        ratios["latency_ratio_pos512_over_pos64"] = (
            _median(latency, f"backpack_pos{high}") / _median(latency, f"backpack_pos{low}"))
    memory = results.get("memory")
    if memory:
        longest = max((key for key in memory if key.startswith("seq")), key=lambda key: int(key[3:]))
        ratios["peak_mem_ratio_fused_over_materialized"] = memory[longest]["ratio_fused_over_materialized_step_peak"]
    return ratios


def target_met(key: str, value: float | None) -> bool | None:
    """Whether a ratio meets its issue-6 target (None when not measured)."""
    if value is None:
        return None
    op, bound = TARGETS[key]
    return value <= bound if op == "<=" else value >= bound


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.3g}{unit}" if abs(value) < 1000 else f"{value:,.0f}{unit}"


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[value]


def markdown_table(results: dict) -> str:
    """The Performance table: one row per comparison with both sides, the ratio and its target."""
    ratios = results["ratios"]
    rows = ["| measurement | Backpack | baseline | ratio | target | met |", "|---|---|---|---|---|---|"]

    def add(label: str, left: str, right: str, key: str | None, value: float | None = None) -> None:
        value = ratios.get(key) if key and value is None else value
        target = f"{TARGETS[key][0]} {TARGETS[key][1]:g}" if key else "-"
        rows.append(f"| {label} | {left} | {right} | {_fmt(value)} | {target} | "
                    f"{_met(target_met(key, value)) if key else '-'} |")

    for section, label, key in (("forward", "forward", "forward_ratio_backpack_over_gpt2"),
                                ("train_step", "train step (fwd+bwd+AdamW)", "train_step_ratio_backpack_over_gpt2")):
        if section in results:
            entry = results[section]
            add(f"{label}, {entry['batch']}x{entry['seq']} (s, GPT-2 baseline)", _fmt(_median(entry, "backpack")),
                _fmt(_median(entry, "gpt2")), key)
    for name, entry in results.get("generate", {}).items():
        size = f"batch {entry['batch']}, {entry['new_tokens']} new tokens"
        key_gpt2 = "generate_ratio_vs_gpt2_tokens_per_s" if name == next(iter(results["generate"])) else None
        add(f"generate tok/s vs GPT-2 generate, {size}", _fmt(entry["backpack_cached"]["tokens_per_s"]),
            _fmt(entry["gpt2_cached"]["tokens_per_s"]), key_gpt2,
            entry["backpack_cached"]["tokens_per_s"] / entry["gpt2_cached"]["tokens_per_s"])
        if "backpack_full_recompute" in entry:
            add(f"generate tok/s vs full-recompute loop, {size}", _fmt(entry["backpack_cached"]["tokens_per_s"]),
                _fmt(entry["backpack_full_recompute"]["tokens_per_s"]), "generate_speedup_vs_full_recompute",
                entry["backpack_full_recompute"]["median_s"] / entry["backpack_cached"]["median_s"])
    latency = results.get("latency")
    if latency:
        low, high = latency["positions"]
        for name, key in (("backpack", "latency_ratio_pos512_over_pos64"), ("gpt2", None)):
            value = _median(latency, f"{name}_pos{high}") / _median(latency, f"{name}_pos{low}")
            add(f"{'Backpack' if name == 'backpack' else 'GPT-2'} step latency, pos {high} vs pos {low} (ms)",
                _fmt(_median(latency, f"{name}_pos{high}") * 1e3), _fmt(_median(latency, f"{name}_pos{low}") * 1e3),
                key, value)
    memory = results.get("memory")
    if memory:
        for seq_key in (key for key in memory if key.startswith("seq")):
            cases = memory[seq_key]
            mib = {path: case["step_peak_bytes"] / 2**20 for path, case in cases.items() if isinstance(case, dict)}
            longest = seq_key == max((k for k in memory if k.startswith("seq")), key=lambda k: int(k[3:]))
            reference = f" (GPT-2: {mib['gpt2']:.0f})" if "gpt2" in mib else ""
            add(f"train-step peak MiB over weights+AdamW, fused vs materialised, batch {memory['batch']} x "
                f"{seq_key[3:]}{reference}", _fmt(mib["fused"]), _fmt(mib["materialized"]),
                "peak_mem_ratio_fused_over_materialized" if longest else None,
                cases["ratio_fused_over_materialized_step_peak"])
    utilisation = results.get("mfu")
    if utilisation:
        add("train-step MFU", _fmt(utilisation["backpack"]["mfu"]), _fmt(utilisation["gpt2"]["mfu"]), None, None)
    for name, entry in (results.get("table7") or {}).items():
        if isinstance(entry, dict) and "backpack" in entry:
            add(f"Table 7 forward 32x512 {name} (s, mean)", _fmt(entry["backpack"]["mean_s"]),
                _fmt(entry["gpt2"]["mean_s"]), None, entry["ratio_mean"])
    return "\n".join(rows)


def plot_ratios(ratios: dict[str, float | None], path: str, title: str) -> None:
    """Bar chart of each measured ratio against its target (log scale), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in RATIO_KEYS if ratios.get(key) is not None]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = ["tab:green" if target_met(key, ratios[key]) else "tab:red" for key in keys]
    ax.barh(range(len(keys)), [ratios[key] for key in keys], color=colors)
    for i, key in enumerate(keys):
        ax.plot([TARGETS[key][1]] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.text(ratios[key], i, f" {ratios[key]:.2f}", va="center")
    ax.set_yticks(range(len(keys)), [key.replace("_", " ") for key in keys], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ratio (black bar: target; green: met)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
