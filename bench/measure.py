"""The timed measurements: forward, training step, generation, per-token latency, MFU and the paper's Table 7."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from transformers import GPT2Config, PreTrainedModel

from backpack_bench.configs import BenchSizes, build_models, meta_models
from backpack_bench.data import TokenBatches, packed_blocks
from backpack_bench.timing import interleaved_times, summarize, time_call
from backpack_train.data import collate_blocks
from backpack_train.distinct_words import (
    DistinctWordSenses,
    calibrated_buckets,
    distinct_count,
    plan_distinct_words,
    sample_step_counts,
)
from backpack_train.loss import step_gradients
from configuration_backpack_gpt2 import GPT2_END_OF_TEXT as EOS
from configuration_backpack_gpt2 import GPT2_PADDED_VOCAB_SIZE
from modeling_backpack_gpt2 import CACHE_ARGUMENT

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# Generation variants: "default" = both models' generate() with their default cache (interleaved); "recompute" =
# the published code's loop without a cache; "static" = generate(cache_implementation="static") without any
# compilation; "static_compiled" = the same after transformers' recipe for fast decoding,
# model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True); "gpt2_static_compiled" =
# that recipe applied to GPT-2, for reference.
GENERATE_MODES = ("default", "recompute", "static", "static_compiled", "gpt2_static_compiled")
ERROR_CHARS = 2000


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


def collate(blocks: torch.LongTensor | np.ndarray) -> dict[str, torch.Tensor]:
    """Packed blocks (batch, n + 1) -> a CPU micro-batch, by the trainer's own collator (inputs `block[:-1]`,
    targets `block[1:]`)."""
    return collate_blocks([{"input_ids": row} for row in np.asarray(blocks).tolist()], EOS)


def trainer_distinct_words(model: torch.nn.Module, buckets: tuple[int, ...] | None,
                           shared: bool = True) -> DistinctWordSenses | None:
    """The trainer's distinct-word senses for a Backpack (one table per optimizer step when `shared`, else per
    micro-batch); None for GPT-2. `model` may be compiled (`torch.compile` keeps the module as `_orig_mod`)."""
    module = getattr(model, "_orig_mod", model)
    if not hasattr(module, "backpack"):
        return None
    return DistinctWordSenses(buckets, module.config.vocab_size, module.backpack.word_senses if shared else None)


def step_buckets(micro_batches: list[dict], vocab_size: int) -> tuple[int, ...]:
    """Word-list sizes for timing a fixed step: calibrated on that step's own distinct words, as the trainer
    calibrates on sampled steps."""
    ids = np.concatenate([batch["input_ids"].numpy().reshape(-1) for batch in micro_batches])
    return calibrated_buckets([distinct_count(ids)], ids.size, vocab_size)


def trainer_step(model, optimizer: torch.optim.Optimizer, micro_batches: list[dict], device: torch.device,
                 distinct_words: DistinctWordSenses | None = None) -> torch.Tensor:
    """One optimisation step through the trainer's own step function, `step_gradients` (train/loss.py): CPU
    micro-batches from its collator, their token ids read on the host (distinct-word senses for a Backpack), moved
    to `device`, forward (a compiled `model` covers the forward only, as with `--compile true`), float32
    cross-entropy outside the model, backward scaled by the accumulation; then the AdamW step."""
    optimizer.zero_grad(set_to_none=True)
    accumulation = len(micro_batches)
    loss = step_gradients(model, micro_batches, backward=lambda micro_loss: (micro_loss / accumulation).backward(),
                          distinct_words=distinct_words, device=device)
    optimizer.step()
    return loss


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as in the paper's recipe (the learning rate is irrelevant to timing)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)


def cached_generate(model: PreTrainedModel, prompt: torch.LongTensor, new_tokens: int) -> torch.LongTensor:
    """Greedy `generate()` of exactly `new_tokens` tokens with the model's own cache."""
    with torch.inference_mode():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=EOS, eos_token_id=EOS,
        )


def static_generate(model: PreTrainedModel, prompt: torch.LongTensor, new_tokens: int) -> torch.LongTensor:
    """Greedy `generate()` of exactly `new_tokens` tokens with a `StaticCache` (fixed-size buffers).

    `disable_compile=True` keeps transformers from compiling the forward on its own (it does so on CUDA whenever
    the cache is compileable), so that this measures the static cache alone, or exactly the compilation that
    `compiled_forward` applied.
    """
    with torch.inference_mode():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=EOS, eos_token_id=EOS, cache_implementation="static",
            disable_compile=True,
        )


def full_recompute_generate(model: PreTrainedModel, prompt: torch.LongTensor, new_tokens: int) -> torch.LongTensor:
    """Greedy decoding as the published Backpack code must do it: no cache, the whole prefix every token.

    End-of-text is suppressed like `min_new_tokens` does in `cached_generate`, so both produce the same tokens.
    """
    ids = prompt
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(ids, use_cache=False).logits[:, -1]
            logits[:, EOS] = -float("inf")
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


def describe_error(error: BaseException) -> str:
    """`Type: message`, cut to a length a JSON report can hold (what a failed measurement records instead of a
    number)."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + " [...]"


def dynamo_graph_count() -> int:
    """Graphs torch.compile has built in this process so far (grows on every compilation and recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def dynamo_graph_break_count() -> int:
    """Graph breaks torch.compile has met in this process so far."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


@contextmanager
def compiled_forward(model: PreTrainedModel, backend: str = "inductor") -> Iterator[PreTrainedModel]:
    """transformers' recipe for fast decoding, undone on exit:
    `model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`.

    `mode="reduce-overhead"` (CUDA graphs) only means something to inductor; other backends (`eager` to check the
    capture quickly, as the CPU smoke test does) get `fullgraph=True` alone.
    """
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; choose from {COMPILE_BACKENDS}")
    options = {"mode": "reduce-overhead"} if backend == "inductor" else {}
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True, **options)
    try:
        yield model
    finally:
        del model.forward  # the instance attribute: `forward` is the class's method again
        torch._dynamo.reset()


def decode_step_fn(model: PreTrainedModel, ids: torch.LongTensor, position: int) -> Callable[[], object]:
    """One cached decoding step at `position` (the cache holds `position` tokens), undone after each call.

    The prefix is prefilled once; each call feeds token `position` and crops the cache back, so every call
    measures the same step.
    """
    with torch.inference_mode():
        output = model(ids[:, :position], use_cache=True)
    cache = output[CACHE_ARGUMENT]
    token = ids[:, position : position + 1]

    def run() -> object:
        with torch.inference_mode():
            logits = model(token, use_cache=True, **{CACHE_ARGUMENT: cache}).logits
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


def timed_generation(
    generate, model: PreTrainedModel, prompt: torch.LongTensor, new_tokens: int, device: torch.device, reps: int,
    reference: torch.LongTensor | None, compile_backend: str | None = None,
) -> dict:
    """Time one generation variant on its own: an untimed first call, then `reps` timed calls.

    Compiled, the first call generates the full length (it compiles and records the CUDA graphs for the cache
    size the timed calls use: `first_call_s`); eager, 4 tokens warm the kernels up. A variant the model does not
    support yet (a static cache, a graph break under `fullgraph=True`) records the error string instead of a
    number, and the benchmark moves on.
    """
    call = generate_fn(generate, model, prompt, new_tokens)
    warmup = call if compile_backend else generate_fn(generate, model, prompt, 4)
    try:
        with compiled_forward(model, compile_backend) if compile_backend else nullcontext():
            first_call = time_call(warmup, device)
            graphs_before = dynamo_graph_count()
            times = [time_call(call, device) for _ in range(reps)]
            graphs_during = dynamo_graph_count() - graphs_before
    except Exception as error:  # any failure of the variant is the result to report
        return {"error": describe_error(error)}
    summary = summarize(times)
    entry: dict = {**summary, "first_call_s": first_call,
                   "tokens_per_s": prompt.shape[0] * new_tokens / summary["median_s"]}
    if compile_backend:
        entry.update(compile_backend=compile_backend, graphs_compiled_during_timed_calls=graphs_during)
    if reference is not None:
        entry["matches_default_cache_tokens"] = bool(torch.equal(call.last_output, reference))
    return entry


def bench_generate(
    backpack, gpt2, data: TokenBatches, sizes: BenchSizes, device, tick,
    modes: tuple[str, ...] = ("default", "recompute"), compile_backend: str = "inductor",
    on_partial: Callable[[dict], None] | None = None,
) -> dict:
    """Greedy generation of `new_tokens` per batch size, for each variant in `modes` (see GENERATE_MODES).

    Variants run in the order the GPU targets need them (default cache, the no-cache loop, static + compile,
    static, GPT-2 static + compile), each over every batch size, so that a run cut short by a time box loses the
    least needed ones. The two default-cache `generate()` calls are interleaved repetition by repetition; the others
    run after them in the same process. `on_partial` receives the results after every variant and batch size.
    """
    unknown = set(modes) - set(GENERATE_MODES)
    if unknown:
        raise ValueError(f"unknown generation modes {sorted(unknown)}; choose from {GENERATE_MODES}")
    prompts = {batch: data.batch(batch, sizes.prompt_len, offset=104729).to(device) for batch in sizes.generate_batches}
    results: dict[str, dict] = {
        f"batch{batch}": {"batch": batch, "prompt_len": sizes.prompt_len, "new_tokens": sizes.new_tokens}
        for batch in sizes.generate_batches
    }
    # The default cache's greedy tokens per (model, batch): what the other variants must reproduce.
    references: dict[tuple[str, int], torch.LongTensor] = {}

    def publish() -> None:
        tick()
        if on_partial is not None:
            on_partial(results)

    if "default" in modes:
        for batch, prompt in prompts.items():
            for model in (backpack, gpt2):  # warm-up: kernels, allocator, generation config
                cached_generate(model, prompt, 4)
            candidates = {
                "backpack_cached": generate_fn(cached_generate, backpack, prompt, sizes.new_tokens),
                "gpt2_cached": generate_fn(cached_generate, gpt2, prompt, sizes.new_tokens),
            }
            times = interleaved_times(candidates, device, 0, sizes.generate_reps)
            for name, seconds in times.items():
                summary = summarize(seconds)
                results[f"batch{batch}"][name] = {**summary, "tokens_per_s": batch * sizes.new_tokens
                                                  / summary["median_s"]}
            references[("backpack", batch)] = candidates["backpack_cached"].last_output
            references[("gpt2", batch)] = candidates["gpt2_cached"].last_output
            publish()
    if "recompute" in modes:
        for batch in (b for b in sizes.generate_batches if b in sizes.recompute_batches):
            # One run only: it is O(N^2) and lasts long enough to average the machine's noise out by itself.
            recompute = generate_fn(full_recompute_generate, backpack, prompts[batch], sizes.new_tokens)
            seconds = time_call(recompute, device)
            entry = results[f"batch{batch}"]
            entry["backpack_full_recompute"] = {**summarize([seconds]),
                                                "tokens_per_s": batch * sizes.new_tokens / seconds}
            reference = references.get(("backpack", batch))
            if reference is None:
                reference = cached_generate(backpack, prompts[batch], sizes.new_tokens)
            entry["recompute_matches_cached_tokens"] = bool(torch.equal(recompute.last_output, reference))
            publish()
    for mode, name, model, model_name, backend in (
        ("static_compiled", "backpack_static_compiled", backpack, "backpack", compile_backend),
        ("static", "backpack_static", backpack, "backpack", None),
        ("gpt2_static_compiled", "gpt2_static_compiled", gpt2, "gpt2", compile_backend),
    ):
        if mode not in modes:
            continue
        for batch, prompt in prompts.items():
            results[f"batch{batch}"][name] = timed_generation(
                static_generate, model, prompt, sizes.new_tokens, device, sizes.generate_reps,
                references.get((model_name, batch)), backend)
            publish()
    return results


def trainer_micro_batches(data: TokenBatches, sizes: BenchSizes, offset: int = 7919) -> list[dict]:
    """`train_micro_batches` CPU micro-batches of (train_batch, seq + 1) packed blocks of real text, collated."""
    blocks = data.batch(sizes.train_batch * sizes.train_micro_batches, sizes.seq + 1, offset=offset)
    return [collate(part) for part in blocks.split(sizes.train_batch)]


def bench_trainer_step(backpack, gpt2, data: TokenBatches, sizes: BenchSizes, device, tick) -> dict:
    """The trainer's step, eager (`trainer_step`: `train_micro_batches` micro-batches of (train_batch, seq)):
    the Backpack with its sense network once per distinct word of the step (the trainer's default), the Backpack
    per token (`--distinct_word_senses false`) and GPT-2, interleaved; tokens per second of each."""
    micro_batches = trainer_micro_batches(data, sizes)
    tokens = sum(batch["input_ids"].numel() for batch in micro_batches)
    backpack_optimizer, gpt2_optimizer = make_optimizer(backpack), make_optimizer(gpt2)
    # Eager, as the trainer without --compile: the step's exact word list, no padding to a bucket.
    senses = trainer_distinct_words(backpack, None)
    candidates = {
        "backpack": lambda: trainer_step(backpack, backpack_optimizer, micro_batches, device, senses),
        "backpack_per_token": lambda: trainer_step(backpack, backpack_optimizer, micro_batches, device),
        "gpt2": lambda: trainer_step(gpt2, gpt2_optimizer, micro_batches, device),
    }
    candidates = {name: step for name, step in candidates.items() if name in sizes.trainer_candidates}
    for model in (backpack, gpt2):
        model.train()
    try:
        times = interleaved_times(candidates, device, sizes.warmup, sizes.reps, tick)
    finally:
        for model, optimizer in ((backpack, backpack_optimizer), (gpt2, gpt2_optimizer)):
            optimizer.zero_grad(set_to_none=True)
            model.eval()
        candidates.clear()  # the optimizers' state goes with them
        gc.collect()
    plan = senses.last_plan  # the word list the timed steps used
    results: dict = {"batch": sizes.train_batch, "seq": sizes.seq, "micro_batches": sizes.train_micro_batches,
                     "tokens_per_step": tokens, "distinct_words": plan.distinct,
                     "word_list_length": int(plan.words.numel())}
    for name, seconds in times.items():
        summary = summarize(seconds)
        results[name] = {**summary, "tokens_per_s": tokens / summary["median_s"]}
    results["tokens_per_s_ratio_backpack_over_gpt2"] = (
        results["backpack"]["tokens_per_s"] / results["gpt2"]["tokens_per_s"])
    return results


def bench_train_compiled(
    backpack, gpt2, data: TokenBatches, sizes: BenchSizes, device, tick, backend: str = "inductor"
) -> dict:
    """The trainer's step (`trainer_step`: `train_micro_batches` micro-batches, a Backpack's sense network once
    per distinct word of the step) with the model compiled the way `--compile true` does it (`torch.compile(model)`),
    asking for one graph (`fullgraph=True`), against the eager step, all interleaved, with the Backpack's per-token
    eager step beside them.

    A model whose forward and backward do not capture as one graph records the error and is measured again with
    `fullgraph=False` (graph breaks allowed, counted). `compile_s` is the first call (compilation included);
    `graphs_compiled_during_timed_steps` > 0 means the step recompiles as it goes.
    """
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; choose from {COMPILE_BACKENDS}")
    micro_batches = trainer_micro_batches(data, sizes)
    models = {"backpack": backpack, "gpt2": gpt2}
    optimizers = {name: make_optimizer(model) for name, model in models.items()}
    buckets = step_buckets(micro_batches, backpack.config.vocab_size)
    results: dict = {"batch": sizes.train_batch * sizes.train_micro_batches, "seq": sizes.seq, "backend": backend,
                     "micro_batches": sizes.train_micro_batches, "word_buckets": list(buckets)}
    candidates: dict[str, Callable[[], object]] = {}
    torch._dynamo.reset()
    try:
        for name, model in models.items():
            model.train()
            optimizer = optimizers[name]
            record: dict = {}
            for fullgraph in (True, False):
                compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
                senses = trainer_distinct_words(compiled, buckets)

                def step(compiled_model=compiled, model_optimizer=optimizer, senses=senses):
                    return trainer_step(compiled_model, model_optimizer, micro_batches, device, senses)

                breaks_before = dynamo_graph_break_count()
                try:
                    record["compile_s"] = time_call(step, device)
                except Exception as error:  # a graph break under fullgraph=True: report it, then allow breaks
                    if not fullgraph:
                        raise
                    record["fullgraph_error"] = describe_error(error)
                    continue
                record.update(fullgraph=fullgraph, graph_breaks=dynamo_graph_break_count() - breaks_before)
                candidates[f"{name}_compiled"] = step
                break
            senses = trainer_distinct_words(model, buckets)
            candidates[f"{name}_eager"] = (
                lambda m=model, o=optimizer, senses=senses: trainer_step(m, o, micro_batches, device, senses))
            if senses is not None:
                plan = plan_distinct_words([batch["input_ids"].numpy() for batch in micro_batches], buckets,
                                           model.config.vocab_size)
                results["distinct_words"] = {"words": plan.distinct, "padded_to": int(plan.words.numel()),
                                             "tokens": sum(batch["input_ids"].numel() for batch in micro_batches)}
                # The per-token path (--distinct_word_senses false), eager: what the distinct words save.
                candidates[f"{name}_per_token_eager"] = (
                    lambda m=model, o=optimizer: trainer_step(m, o, micro_batches, device))
            results[f"{name}_compile"] = record
        graphs_before = dynamo_graph_count()
        times = interleaved_times(candidates, device, sizes.warmup, sizes.reps, tick)
        results["graphs_compiled_during_timed_steps"] = dynamo_graph_count() - graphs_before
        results.update({name: summarize(seconds) for name, seconds in times.items()})
    finally:
        for name, model in models.items():
            optimizers[name].zero_grad(set_to_none=True)
            model.eval()
        del optimizers, candidates
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
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


def forward_flops(config: GPT2Config, batch: int, seq: int, sense_words: int | None) -> float:
    """Model FLOPs of one forward of `batch` sequences of `seq` (matmuls only, attention counted over the full
    sequence, PaLM's convention).

    With `sense_words` (a Backpack: the rows its sense network runs on, `batch * seq` per token or a step's distinct
    words), adds the sense network on them, the contextualization key-query layer and the weighted sense sum.
    """
    d, layers, vocab, tokens = config.n_embd, config.n_layer, config.vocab_size, batch * seq
    flops = tokens * (2 * 12 * d * d * layers + 2 * d * vocab + 2 * 2 * seq * d * layers)
    if sense_words is not None:
        k, scale = config.num_senses, config.sense_intermediate_scale
        sense_network = 2 * (2 * 4 * d * d + scale * d * d + scale * d * k * d)
        sense_sum = 2 * seq * d + 2 * seq * k * d  # q.k over k heads of d/k, then weights times k senses of d
        flops += sense_words * sense_network + tokens * (2 * d * 2 * d + sense_sum)
    return float(flops)


def training_flops_per_token(config: GPT2Config, seq: int, tokens: int, sense_words: int | None) -> float:
    """FLOPs per token of a training step (3x the forward) over `tokens` tokens in sequences of `seq`.

    `sense_words`: the rows a Backpack's sense network runs on: `tokens` for the per-token count (the model FLOPs
    MFU is quoted on, what a per-token implementation spends), or a step's word list for what the trainer executes;
    None for GPT-2.
    """
    return 3 * forward_flops(config, tokens / seq, seq, sense_words) / tokens


def mfu(step_seconds: float, flops_per_step: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the device's peak."""
    return None if peak is None else flops_per_step / step_seconds / (peak * 1e12)


def bench_mfu(results: dict, backpack, gpt2, device_name: str, dtype, override: float | None) -> dict:
    """MFU of the measured training steps: eager (`train_step`) and, when measured, compiled (`train_compiled`).

    `mfu` is on the model FLOPs, the Backpack's per-token count (its sense network on every position, as the
    published implementation runs it). The trainer's step runs the sense network on the step's distinct words only:
    its Backpack entries add `executed_flops_per_step` and `mfu_executed`, on the word list it ran on.
    """
    peak = override if override is not None else peak_tflops(device_name, dtype)
    entry: dict = {"peak_tflops": peak}
    for section, suffix in (("train_step", ""), ("train_compiled", "_compiled")):
        measured = results.get(section)
        if not measured:
            continue
        tokens, seq = measured["batch"] * measured["seq"], measured["seq"]
        # the trainer's step (train_compiled) ran the sense network on the step's word list
        words = measured.get("distinct_words", {}).get("padded_to")
        for name, config in (("backpack", backpack.config), ("gpt2", gpt2.config)):
            timing = measured.get(f"{name}{suffix}")
            if not timing:
                continue
            per_token_words = tokens if name == "backpack" else None
            step_flops = training_flops_per_token(config, seq, tokens, per_token_words) * tokens
            record = {"flops_per_step": step_flops, "mfu": mfu(timing["median_s"], step_flops, peak)}
            if name == "backpack" and words is not None:
                executed = training_flops_per_token(config, seq, tokens, words) * tokens
                record.update(executed_flops_per_step=executed, sense_network_words=words,
                              mfu_executed=mfu(timing["median_s"], executed, peak))
            entry[f"{name}{suffix}"] = record
    return entry


def counted_flops(step: Callable[[], object]) -> dict[str, int]:
    """FLOPs of everything `step` runs on the meta device, forward and backward (torch's FlopCounterMode):
    ``total``, and ``attention``, the part in attention's n x n products (GPT-2's, and the Backpack's weighted
    sense sum), counted over the full matrix.

    On the meta device `scaled_dot_product_attention` decomposes into batched matmuls (bmm), which nothing else
    in either model uses (linear layers run as mm/addmm), so bmm FLOPs are the attention FLOPs. (On a CPU, torch's
    fused attention kernel is not counted at all.) No tensor holds values on the meta device, so transformers'
    check for several sequences packed in one row (which reads the position ids back) is answered as it would be
    for the trainer's blocks, whose positions run 0 .. n-1 in every row: none.
    """
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, mock.patch("transformers.masking_utils.find_packed_sequence_indices", return_value=None):
        step()
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(flops for op, flops in by_op.items() if str(op) == "aten.bmm")
    return {"total": int(counter.get_total_flops()), "attention": int(attention)}


ATTENTION_COUNTS = ("causal", "full", "none")


def bench_train_cost(config_name: str, sizes: BenchSizes, data_source: str, seed: int = 0) -> dict:
    """FLOPs per token of one optimizer step of the trainer, per process: Backpack (its sense network once per
    distinct word of the step) and GPT-2, counted on the trainer's own step function (`step_gradients`).

    One process's step is `train_cost_tokens` tokens: micro-batches of `train_cost_batch` x `seq` tokens, of
    random packed blocks of the corpus (the trainer's embedded corpus for real text), as the trainer's data order
    draws them. The word lists are padded to buckets calibrated on sampled steps of the same corpus, as the trainer
    does. Counting runs on the meta device (shapes only, no arithmetic), so Small at 131,072 tokens takes seconds;
    the AdamW update (elementwise, no FLOPs counted) is left out.

    Attention's n x n products are counted three ways (`ratio_by_attention_count`): ``causal`` (half of each
    matrix, what the causal kernels both models run compute; the headline), ``full`` (the whole matrix, torch's
    count) and ``none`` (left out, as FlopCounterMode on a CPU leaves out the fused kernel). Beside the trainer's
    Backpack: the per-token path (`--distinct_word_senses false`: the FLOPs a per-token implementation spends, the
    ones MFU is quoted on), one table per micro-batch (the path under FSDP) and the exact word list (eager training,
    no padding to a bucket).
    """
    seq, batch = sizes.seq, sizes.train_cost_batch
    accumulation = max(1, round(sizes.train_cost_tokens / (batch * seq)))
    blocks_per_step = accumulation * batch
    blocks = packed_blocks(data_source, seq + 1, GPT2_PADDED_VOCAB_SIZE, seed, min_blocks=blocks_per_step)
    order = np.random.default_rng(seed).permutation(len(blocks))
    micro_batches = [collate(part) for part in np.split(blocks[np.resize(order, blocks_per_step)], accumulation)]
    tokens = blocks_per_step * seq
    backpack, gpt2 = meta_models(config_name, seq)
    vocab_size = backpack.config.vocab_size
    step_counts = sample_step_counts(lambda indices: blocks[indices], len(blocks), blocks_per_step, EOS, seed)
    micro_counts = sample_step_counts(lambda indices: blocks[indices], len(blocks), batch, EOS, seed)
    step_buckets_ = calibrated_buckets(step_counts, tokens, vocab_size)
    micro_buckets = calibrated_buckets(micro_counts, batch * seq, vocab_size)

    def count(model, batches: list[dict], senses: DistinctWordSenses | None, repeat: int = 1) -> dict[str, int]:
        model.train()
        flops = counted_flops(lambda: step_gradients(
            model, batches, backward=lambda loss: (loss / accumulation).backward(), distinct_words=senses,
            device="meta"))
        model.zero_grad(set_to_none=True)
        return {key: value * repeat for key, value in flops.items()}

    # GPT-2 and the per-token Backpack: every micro-batch has the same shapes, so one is counted for all.
    counted = {"gpt2": count(gpt2, micro_batches[:1], None, accumulation),
               "backpack_per_token": count(backpack, micro_batches[:1], None, accumulation)}
    shared = trainer_distinct_words(backpack, step_buckets_)
    counted["backpack"] = count(backpack, micro_batches, shared)  # the trainer's step: one table, M micro-batches
    plan = shared.last_plan
    # Without --compile the trainer takes the step's exact word list: no padding to a bucket.
    counted["backpack_exact_words"] = count(backpack, micro_batches, trainer_distinct_words(backpack, None))
    # One table per micro-batch: micro-batches padded to the same bucket cost the same.
    sizes_of = [plan_distinct_words([batch_["input_ids"].numpy()], micro_buckets, vocab_size).words.numel()
                for batch_ in micro_batches]
    per_micro = {"total": 0, "attention": 0}
    for size in sorted(set(sizes_of)):
        first = sizes_of.index(size)
        part = count(backpack, micro_batches[first:first + 1], trainer_distinct_words(backpack, micro_buckets, False),
                     sizes_of.count(size))
        per_micro = {key: per_micro[key] + part[key] for key in per_micro}
    counted["backpack_table_per_micro_batch"] = per_micro

    def per_token(flops: dict[str, int], attention: str) -> float:
        share = {"causal": 0.5, "full": 1.0, "none": 0.0}[attention]
        return (flops["total"] - (1 - share) * flops["attention"]) / tokens

    ratios = {attention: per_token(counted["backpack"], attention) / per_token(counted["gpt2"], attention)
              for attention in ATTENTION_COUNTS}
    return {
        "flops_per_token": {name: per_token(counted[name], "causal") for name in ("backpack", "gpt2")},
        "ratio": ratios["causal"],
        "tokens_per_step_per_process": tokens,
        "size": config_name,
        "attention_count": "causal: half of each n x n attention product, as causal kernels compute",
        "ratio_by_attention_count": ratios,
        "flops_per_token_by_attention_count": {
            attention: {name: per_token(flops, attention) for name, flops in counted.items()}
            for attention in ATTENTION_COUNTS},
        "backpack_variants_ratio": {
            name: per_token(counted[name], "causal") / per_token(counted["gpt2"], "causal")
            for name in ("backpack_per_token", "backpack_table_per_micro_batch", "backpack_exact_words")},
        "micro_batches": accumulation,
        "batch": batch,
        "seq": seq,
        "data": data_source,
        "distinct_words": plan.distinct,
        "distinct_fraction": plan.distinct / tokens,
        "word_list_padded_to": int(plan.words.numel()),
        "word_buckets": list(step_buckets_),
        "micro_batch_word_buckets": list(micro_buckets),
        "counted": "torch FlopCounterMode on the meta device: forward + backward of every micro-batch of one "
                   "process's optimizer step (trainer's step_gradients); AdamW update not counted",
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
