"""The timed measurements: forward, training step, generation, per-token latency, MFU and the paper's Table 7."""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable

import torch
from transformers import GPT2Config, PreTrainedModel

from bench.configs import BenchSizes, build_models
from bench.data import TokenBatches
from bench.timing import interleaved_times, summarize, time_call

GPT2_EOS = 50256


# --- single operations ------------------------------------------------------------------------------------------


def forward_fn(model: PreTrainedModel, ids: torch.LongTensor) -> Callable[[], object]:
    """One inference forward over the full batch (no cache: what a training or scoring pass computes)."""

    def run() -> object:
        with torch.inference_mode():
            return model(ids, use_cache=False).logits

    return run


def train_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer, ids: torch.LongTensor, **forward_kwargs):
    """Forward with next-token loss, backward, AdamW step: one optimisation step on `ids`."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, use_cache=False, **forward_kwargs).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as in the paper's recipe (the learning rate is irrelevant to timing)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)


def cached_generate(model: PreTrainedModel, prompt: torch.LongTensor, new_tokens: int) -> torch.LongTensor:
    """Greedy `generate()` of exactly `new_tokens` tokens with the model's own cache."""
    with torch.inference_mode():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=GPT2_EOS, eos_token_id=GPT2_EOS,
        )


def full_recompute_generate(model: PreTrainedModel, prompt: torch.LongTensor, new_tokens: int) -> torch.LongTensor:
    """Greedy decoding as the published Backpack code must do it: no cache, the whole prefix every token.

    End-of-text is suppressed like `min_new_tokens` does in `cached_generate`, so both produce the same tokens.
    """
    ids = prompt
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(ids, use_cache=False).logits[:, -1]
            logits[:, GPT2_EOS] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


class generate_fn:  # noqa: N801 - used like the other *_fn factories
    """A zero-argument generation call for the timer, keeping its last output (to compare tokens afterwards)."""

    def __init__(self, generate, model: PreTrainedModel, prompt: torch.LongTensor, new_tokens: int):
        self.generate, self.model, self.prompt, self.new_tokens = generate, model, prompt, new_tokens
        self.last_output: torch.LongTensor | None = None

    def __call__(self) -> torch.LongTensor:
        self.last_output = self.generate(self.model, self.prompt, self.new_tokens)
        return self.last_output


def cache_argument(model: PreTrainedModel) -> str:
    """The forward argument that takes a cache: `cache` on newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_step_fn(model: PreTrainedModel, ids: torch.LongTensor, position: int) -> Callable[[], object]:
    """One cached decoding step at `position` (the cache holds `position` tokens), undone after each call.

    The prefix is prefilled once; each call feeds token `position` and crops the cache back, so every call
    measures the same step.
    """
    with torch.inference_mode():
        output = model(ids[:, :position], use_cache=True)
    cache = output.get("cache") or output.get("past_key_values")
    token = ids[:, position : position + 1]
    argument = cache_argument(model)

    def run() -> object:
        with torch.inference_mode():
            logits = model(token, use_cache=True, **{argument: cache}).logits
        cache.crop(-1)
        return logits

    return run


# --- sections ---------------------------------------------------------------------------------------------------


def bench_forward(backpack, gpt2, data: TokenBatches, sizes: BenchSizes, device, tick) -> dict:
    """Forward of both models on the same (forward_batch, seq) batch of real tokens."""
    ids = data.batch(sizes.forward_batch, sizes.seq).to(device)
    times = interleaved_times(
        {"backpack": forward_fn(backpack, ids), "gpt2": forward_fn(gpt2, ids)}, device, sizes.warmup, sizes.reps, tick
    )
    return {"batch": sizes.forward_batch, "seq": sizes.seq, **{name: summarize(t) for name, t in times.items()}}


def bench_train_step(backpack, gpt2, data: TokenBatches, sizes: BenchSizes, device, tick) -> dict:
    """Forward + backward + AdamW step of both models on the same (train_batch, seq) batch."""
    ids = data.batch(sizes.train_batch, sizes.seq, offset=7919).to(device)
    optimizers = {"backpack": make_optimizer(backpack), "gpt2": make_optimizer(gpt2)}
    models = {"backpack": backpack, "gpt2": gpt2}
    for model in models.values():
        model.train()
    try:
        times = interleaved_times(
            {name: (lambda m=models[name], o=optimizers[name]: train_step(m, o, ids)) for name in models},
            device, sizes.warmup, sizes.reps, tick,
        )
    finally:
        for name, model in models.items():
            optimizers[name].zero_grad(set_to_none=True)
            model.eval()
        del optimizers
        gc.collect()
    return {"batch": sizes.train_batch, "seq": sizes.seq, **{name: summarize(t) for name, t in times.items()}}


def bench_generate(backpack, gpt2, data: TokenBatches, sizes: BenchSizes, device, tick) -> dict:
    """Greedy generation of `new_tokens` per batch size: Backpack cached, GPT-2 cached, Backpack full recompute."""
    results: dict[str, dict] = {}
    for batch in sizes.generate_batches:
        prompt = data.batch(batch, sizes.prompt_len, offset=104729).to(device)
        for model in (backpack, gpt2):  # warm-up: kernels, allocator, generation config
            cached_generate(model, prompt, 4)
        times = interleaved_times(
            {
                "backpack_cached": generate_fn(cached_generate, backpack, prompt, sizes.new_tokens),
                "gpt2_cached": generate_fn(cached_generate, gpt2, prompt, sizes.new_tokens),
            },
            device, 0, sizes.generate_reps, tick,
        )
        entry = {name: summarize(t) for name, t in times.items()}
        if batch in sizes.recompute_batches:
            # One run only: it is O(N^2) and lasts long enough to average the machine's noise out by itself.
            recompute = generate_fn(full_recompute_generate, backpack, prompt, sizes.new_tokens)
            entry["backpack_full_recompute"] = summarize([time_call(recompute, device)])
            entry["recompute_matches_cached_tokens"] = bool(
                torch.equal(recompute.last_output, cached_generate(backpack, prompt, sizes.new_tokens))
            )
            tick()
        tokens = batch * sizes.new_tokens
        for name in list(entry):
            if isinstance(entry[name], dict):
                entry[name]["tokens_per_s"] = tokens / entry[name]["median_s"]
        results[f"batch{batch}"] = {"batch": batch, "prompt_len": sizes.prompt_len,
                                    "new_tokens": sizes.new_tokens, **entry}
    return results


def bench_latency(backpack, gpt2, data: TokenBatches, sizes: BenchSizes, device, tick) -> dict:
    """Per-token latency of one cached decoding step (batch 1) at each of `latency_positions`."""
    ids = data.batch(1, max(sizes.latency_positions) + 1, offset=15485863 % data.stream.numel()).to(device)
    candidates = {
        f"{name}_pos{position}": decode_step_fn(model, ids, position)
        for name, model in (("backpack", backpack), ("gpt2", gpt2))
        for position in sizes.latency_positions
    }
    times = interleaved_times(candidates, device, sizes.warmup + 2, sizes.latency_reps)
    tick()
    return {"batch": 1, "positions": list(sizes.latency_positions), **{n: summarize(t) for n, t in times.items()}}


# --- model FLOPs and utilisation (CUDA) -------------------------------------------------------------------------

# Dense peak TFLOP/s per GPU and dtype (fp32 = no TF32, PyTorch's default for matmuls).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """Vendor dense peak for a GPU name, or None when unknown (pass --peak-tflops)."""
    dtype_name = str(dtype).removeprefix("torch.")
    for gpu, table in PEAK_TFLOPS.items():
        if gpu in device_name:
            return table.get(dtype_name)
    return None


def forward_flops(config: GPT2Config, batch: int, seq: int, distinct_tokens: int | None) -> float:
    """Model FLOPs of one forward (matmuls only, attention counted over the full sequence, PaLM's convention).

    With `distinct_tokens` (a Backpack), adds the sense network (run once per distinct token), the
    contextualization key-query layer and the weighted sense sum.
    """
    d, layers, vocab, tokens = config.n_embd, config.n_layer, config.vocab_size, batch * seq
    flops = tokens * (2 * 12 * d * d * layers + 2 * d * vocab + 2 * 2 * seq * d * layers)
    if distinct_tokens is not None:
        k, scale = config.num_senses, config.sense_intermediate_scale
        sense_network = 2 * (2 * 4 * d * d + scale * d * d + scale * d * k * d)
        sense_sum = 2 * seq * d + 2 * seq * k * d  # q.k over k heads of d/k, then weights times k senses of d
        flops += distinct_tokens * sense_network + tokens * (2 * d * 2 * d + sense_sum)
    return float(flops)


def mfu(step_seconds: float, flops_per_step: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the device's peak."""
    return None if peak is None else flops_per_step / step_seconds / (peak * 1e12)


def bench_mfu(train: dict, backpack, gpt2, data: TokenBatches, device_name: str, dtype, override: float | None):
    """MFU of the measured training steps (3x forward FLOPs per step)."""
    peak = override if override is not None else peak_tflops(device_name, dtype)
    batch, seq = train["batch"], train["seq"]
    distinct = int(data.batch(batch, seq, offset=7919).unique().numel())
    flops = {
        "backpack": 3 * forward_flops(backpack.config, batch, seq, distinct),
        "gpt2": 3 * forward_flops(gpt2.config, batch, seq, None),
    }
    return {
        "peak_tflops": peak,
        "distinct_tokens": distinct,
        **{name: {"flops_per_step": f, "mfu": mfu(train[name]["median_s"], f, peak)} for name, f in flops.items()},
    }


def bench_table7(sizes: BenchSizes, data: TokenBatches, device, dtype, attn: str, tick) -> dict:
    """The paper's Table 7: forward seconds at batch 32 x 512, mean of `table7_reps`, per model size."""
    results = {}
    for name in sizes.table7_configs:
        backpack, gpt2 = build_models(name, 512, attn, device, dtype)
        ids = data.batch(sizes.table7_batch, 512).to(device)
        times = interleaved_times(
            {"backpack": forward_fn(backpack, ids), "gpt2": forward_fn(gpt2, ids)}, device, 3, sizes.table7_reps
        )
        results[name] = {
            name_: {"mean_s": sum(t) / len(t), **summarize(t)} for name_, t in times.items()
        }
        results[name]["ratio_mean"] = results[name]["backpack"]["mean_s"] / results[name]["gpt2"]["mean_s"]
        del backpack, gpt2
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tick()
    return {"batch": sizes.table7_batch, "seq": 512, "reps": sizes.table7_reps, **results}
