"""Headline ratios, targets, the markdown table and the optional chart."""

from __future__ import annotations

# Targets: (comparison, bound). Checked in the benchmark only, never in tests or CI. Speed (on a GPU, bf16, Small):
# default-cache generate() >= 0.9x GPT-2's tokens/s at batch 1 and 8 and >= 20x the no-cache loop at 512 new
# tokens; static cache + torch.compile >= 2x GPT-2's default generate(); forward and train step <= 1.15x GPT-2;
# compiled training >= 0.85x GPT-2's tokens/s, i.e. a step time ratio <= 1 / 0.85. Decoding latency and memory:
# any device.
TARGETS: dict[str, tuple[str, float]] = {
    "forward_ratio_backpack_over_gpt2": ("<=", 1.15),
    "train_step_ratio_backpack_over_gpt2": ("<=", 1.15),
    "train_compiled_ratio_backpack_over_gpt2": ("<=", round(1 / 0.85, 3)),
    "generate_speedup_vs_full_recompute": (">=", 20.0),
    "generate_ratio_vs_gpt2_tokens_per_s": (">=", 0.9),
    "generate_ratio_vs_gpt2_tokens_per_s_max_batch": (">=", 0.9),
    "static_compiled_ratio_vs_gpt2_default": (">=", 2.0),
    "static_compiled_ratio_vs_gpt2_default_max_batch": (">=", 2.0),
    "latency_ratio_pos512_over_pos64": ("<=", 1.5),
    "peak_mem_ratio_fused_over_materialized": ("<=", 0.6),
}
RATIO_KEYS = tuple(TARGETS)
MET_LEGEND = ("met: yes = within its target; **no** = measured and outside its target (a shortfall of the model on "
              "this device, not a failed run: the benchmark exits 0 whatever it measures); - = no target, or not "
              "measured. Most targets are set for a GPU at Small size, so on a CPU, and with --quick's small inputs, "
              "**no** cells are expected.")


def _median(entry: dict, name: str) -> float:
    return entry[name]["median_s"]


def _measured(entry: dict, name: str) -> bool:
    """Whether `entry[name]` holds a timing (not missing, not an error record)."""
    return isinstance(entry.get(name), dict) and "median_s" in entry[name]


def _tokens_per_s_ratio(entry: dict, numerator: str, denominator: str) -> float | None:
    if _measured(entry, numerator) and _measured(entry, denominator):
        return entry[numerator]["tokens_per_s"] / entry[denominator]["tokens_per_s"]
    return None


def headline_ratios(results: dict) -> dict[str, float | None]:
    """The headline ratios from the raw results (None where a section or variant was not run, or failed).

    Generation ratios are taken at the first batch size (batch 1) and, for `_max_batch`, the largest (and the
    full-recompute speedup at the first batch it was run for); the memory ratio at the longest sequence, on the
    step peak (memory the step adds over weights + AdamW state).
    """
    ratios: dict[str, float | None] = dict.fromkeys(RATIO_KEYS)
    for section, key, suffix in (("forward", "forward_ratio_backpack_over_gpt2", ""),
                                 ("train_step", "train_step_ratio_backpack_over_gpt2", ""),
                                 ("train_compiled", "train_compiled_ratio_backpack_over_gpt2", "_compiled")):
        entry = results.get(section) or {}
        if _measured(entry, f"backpack{suffix}") and _measured(entry, f"gpt2{suffix}"):
            ratios[key] = _median(entry, f"backpack{suffix}") / _median(entry, f"gpt2{suffix}")
    generate = results.get("generate") or {}
    if generate:
        first = next(iter(generate.values()))
        largest = max(generate.values(), key=lambda entry: entry["batch"])
        for key, entry in (("", first), ("_max_batch", largest)):
            ratios[f"generate_ratio_vs_gpt2_tokens_per_s{key}"] = _tokens_per_s_ratio(
                entry, "backpack_cached", "gpt2_cached")
            ratios[f"static_compiled_ratio_vs_gpt2_default{key}"] = _tokens_per_s_ratio(
                entry, "backpack_static_compiled", "gpt2_cached")
        for entry in generate.values():
            if _measured(entry, "backpack_full_recompute") and _measured(entry, "backpack_cached"):
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
    """Whether a ratio meets its target (None when not measured)."""
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

    for section, label, key, suffix in (
        ("forward", "forward", "forward_ratio_backpack_over_gpt2", ""),
        ("train_step", "train step (fwd+bwd+AdamW)", "train_step_ratio_backpack_over_gpt2", ""),
        ("train_compiled", "compiled train step", "train_compiled_ratio_backpack_over_gpt2", "_compiled"),
    ):
        entry = results.get(section) or {}
        if _measured(entry, f"backpack{suffix}") and _measured(entry, f"gpt2{suffix}"):
            add(f"{label}, {entry['batch']}x{entry['seq']} (s, GPT-2 baseline)",
                _fmt(_median(entry, f"backpack{suffix}")), _fmt(_median(entry, f"gpt2{suffix}")), key)
    generate = results.get("generate") or {}
    if generate:
        first_batch = next(iter(generate.values()))["batch"]
        largest_batch = max(entry["batch"] for entry in generate.values())
    for entry in generate.values():
        size = f"batch {entry['batch']}, {entry['new_tokens']} new tokens"
        suffix = "" if entry["batch"] == first_batch else "_max_batch" if entry["batch"] == largest_batch else None
        rate = {name: _fmt(entry[name]["tokens_per_s"]) if _measured(entry, name) else
                ("error" if "error" in entry.get(name, {}) else "-")
                for name in ("backpack_cached", "gpt2_cached", "backpack_full_recompute", "backpack_static",
                             "backpack_static_compiled", "gpt2_static_compiled")}
        if _measured(entry, "backpack_cached") and _measured(entry, "gpt2_cached"):
            add(f"generate tok/s vs GPT-2 generate, {size}", rate["backpack_cached"], rate["gpt2_cached"],
                f"generate_ratio_vs_gpt2_tokens_per_s{suffix}" if suffix is not None else None,
                _tokens_per_s_ratio(entry, "backpack_cached", "gpt2_cached"))
        if _measured(entry, "backpack_full_recompute") and _measured(entry, "backpack_cached"):
            add(f"generate tok/s vs full-recompute loop, {size}", rate["backpack_cached"],
                rate["backpack_full_recompute"], "generate_speedup_vs_full_recompute",
                _median(entry, "backpack_full_recompute") / _median(entry, "backpack_cached"))
        if "backpack_static" in entry:
            add(f"static-cache generate tok/s vs GPT-2 generate, {size}", rate["backpack_static"],
                rate["gpt2_cached"], None, _tokens_per_s_ratio(entry, "backpack_static", "gpt2_cached"))
        if "backpack_static_compiled" in entry:
            add(f"static cache + compile tok/s vs GPT-2 generate, {size}", rate["backpack_static_compiled"],
                rate["gpt2_cached"], f"static_compiled_ratio_vs_gpt2_default{suffix}" if suffix is not None else None,
                _tokens_per_s_ratio(entry, "backpack_static_compiled", "gpt2_cached"))
        if "gpt2_static_compiled" in entry:
            add(f"GPT-2 static cache + compile tok/s vs GPT-2 generate, {size}", rate["gpt2_static_compiled"],
                rate["gpt2_cached"], None, _tokens_per_s_ratio(entry, "gpt2_static_compiled", "gpt2_cached"))
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
        for suffix, label in (("", "train-step MFU"), ("_compiled", "compiled train-step MFU")):
            if f"backpack{suffix}" in utilisation and f"gpt2{suffix}" in utilisation:
                backpack = utilisation[f"backpack{suffix}"]
                add(f"{label} (model FLOPs: sense network per token)", _fmt(backpack["mfu"]),
                    _fmt(utilisation[f"gpt2{suffix}"]["mfu"]), None, None)
                if "mfu_executed" in backpack:
                    add(f"{label}, executed FLOPs (sense network on the step's {backpack['sense_network_words']:,} "
                        "words)", _fmt(backpack["mfu_executed"]), "-", None, None)
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
