"""Correctness of the model on an accelerator: the device check's step (b).

    python bench/device_golden.py --json golden.json [--fixture DIR] [--device cuda|cpu]

On the tiny published-layout checkpoint whose float64 outputs the published implementation produced
(`fixtures/backpack-tiny/expected.pt`), measures:

* `golden_fp32`: the maximum relative logits error (max |a - e| / max |e|, the model tests' measure) of the fp32
  forward on the device against `expected.pt`, for the sdpa and eager paths, with α and the senses as well;
* `low_precision`: bf16 and fp16 logits against the fp32 logits on the same device (relative error, and the share
  of positions whose top-1 token agrees);
* `cache_equals_full`: the logits of a prefill followed by one-token cached steps against one full forward (fp32);
* `padded_equals_alone`: a left-padded batch against each row alone (fp32), for the forward and greedy generation;
* `static_cache`: greedy `generate(cache_implementation="static")` against the default cache (fp32, padded batch).

It reports numbers only; the device check's summary compares them with thresholds. Every check that raises
records its error string and the next one runs; the JSON is rewritten (atomically) after every check.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import transformers

from backpack.files import write_json_atomically
from backpack_bench.measure import describe_error
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIXTURE_NAME = os.path.join("fixtures", "backpack-tiny")
NEW_TOKENS = 12


def default_fixture() -> str:
    """The fixture carried to the device (`.device/`), else the reference data beside the checkout."""
    shared = os.environ.get("BACKPACK_SHARED", os.path.join(os.path.dirname(REPO_ROOT), "shared"))
    for folder in (os.path.join(REPO_ROOT, ".device", FIXTURE_NAME), os.path.join(shared, FIXTURE_NAME)):
        if os.path.isfile(os.path.join(folder, "expected.pt")):
            return folder
    return os.path.join(REPO_ROOT, ".device", FIXTURE_NAME)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|, in float64 on the CPU."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def load(fixture: str, device: torch.device, dtype: torch.dtype, attn: str = "sdpa") -> BackpackGPT2LMHeadModel:
    """The fixture checkpoint on `device` in `dtype`, in eval mode (its config has dropout 0.1)."""
    model = BackpackGPT2LMHeadModel.from_pretrained(fixture, attn_implementation=attn)
    return model.to(device=device, dtype=dtype).eval()


def left_padded(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths, left-padded into one batch, and the attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.stack([F.pad(row, (width - len(row), 0), value=pad_id) for row in rows])
    mask = torch.stack([F.pad(torch.ones_like(row), (width - len(row), 0)) for row in rows])
    return ids, mask


def check_golden(fixture: str, expected: dict, device: torch.device) -> dict:
    result = {}
    for attn in ("sdpa", "eager"):
        model = load(fixture, device, torch.float32, attn)
        with torch.no_grad():
            out = model(expected["input_ids"].to(device), output_contextualization=True, output_senses=True,
                        use_cache=False)
        result[attn] = {name: relative_error(getattr(out, name), expected[name])
                        for name in ("logits", "contextualization", "senses")}
    return result


def check_low_precision(fixture: str, expected: dict, device: torch.device) -> dict:
    ids = expected["input_ids"].to(device)
    with torch.no_grad():
        reference = load(fixture, device, torch.float32)(ids, use_cache=False).logits.float()
    result = {}
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        try:
            with torch.no_grad():
                logits = load(fixture, device, dtype)(ids, use_cache=False).logits.float()
            result[name] = {
                "logits_relative_error_vs_fp32": relative_error(logits, reference),
                "logits_relative_error_vs_expected": relative_error(logits, expected["logits"]),
                "top1_agreement_with_fp32": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            }
        except Exception as error:  # e.g. a dtype the device's kernels lack: the next dtype still runs
            result[name] = {"error": describe_error(error)}
    return result


def check_cache(fixture: str, expected: dict, device: torch.device) -> dict:
    model = load(fixture, device, torch.float32)
    ids = expected["input_ids"].to(device)
    result = {}
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for prefix in (1, ids.shape[1] // 2):
            out = model(ids[:, :prefix], use_cache=True)
            steps, cache = [out.logits], out.cache
            for position in range(prefix, ids.shape[1]):
                out = model(ids[:, position : position + 1], use_cache=True, cache=cache)
                steps.append(out.logits)
                cache = out.cache
            result[f"prefill{prefix}_relative_error"] = relative_error(torch.cat(steps, dim=1), full)
    return result


def padded_batch(expected: dict, device: torch.device, pad_id: int) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                             torch.Tensor]:
    """Three rows of the fixture's inputs with different lengths, left-padded."""
    source = expected["input_ids"]
    rows = [source[0], source[1, :15], source[0, 5:12]]
    ids, mask = left_padded(rows, pad_id)
    return [row.to(device) for row in rows], ids.to(device), mask.to(device)


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, pad_id: int, **settings) -> torch.Tensor:
    """The `NEW_TOKENS` greedy tokens after the prompt (end-of-text allowed, no early stop)."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=None, **settings)
    return out[:, ids.shape[1] :]


def check_padding(fixture: str, expected: dict, device: torch.device) -> dict:
    model = load(fixture, device, torch.float32)
    pad_id = model.config.eos_token_id
    rows, ids, mask = padded_batch(expected, device, pad_id)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=False).logits
        errors = [relative_error(batched[i, -len(row) :], model(row[None], use_cache=False).logits[0])
                  for i, row in enumerate(rows)]
    generated = greedy(model, ids, mask, pad_id)
    alone = [greedy(model, row[None], torch.ones_like(row[None]), pad_id)[0] for row in rows]
    return {
        "row_lengths": [len(row) for row in rows],
        "forward_max_relative_error": max(errors),
        "greedy_tokens_equal_rows_alone": all(torch.equal(generated[i], alone[i]) for i in range(len(rows))),
    }


def check_static_cache(fixture: str, expected: dict, device: torch.device) -> dict:
    model = load(fixture, device, torch.float32)
    pad_id = model.config.eos_token_id
    _, ids, mask = padded_batch(expected, device, pad_id)
    default = greedy(model, ids, mask, pad_id)
    static = greedy(model, ids, mask, pad_id, cache_implementation="static", disable_compile=True)
    return {"greedy_tokens_equal_default_cache": bool(torch.equal(static, default))}


CHECKS: dict[str, Callable[[str, dict, torch.device], dict]] = {
    "golden_fp32": check_golden,
    "low_precision": check_low_precision,
    "cache_equals_full": check_cache,
    "padded_equals_alone": check_padding,
    "static_cache": check_static_cache,
}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default=None, help="folder with config.json, pytorch_model.bin, expected.pt")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", dest="json_path", required=True)
    args = parser.parse_args(argv)
    fixture = args.fixture or default_fixture()
    expected_path = os.path.join(fixture, "expected.pt")
    if not os.path.isfile(expected_path):
        raise SystemExit(f"fixture not found: {expected_path} (copy it with bench/prepare_device_check.sh, or "
                         "pass --fixture)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    expected = torch.load(expected_path, weights_only=True)
    results: dict = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "fixture": os.path.relpath(fixture, REPO_ROOT), "measure": "max |a - e| / max |e|",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "complete": False,
    }
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            results[name] = check(fixture, expected, device)
        except Exception as error:  # one failing check must not hide the others
            results[name] = {"error": describe_error(error)}
        results[name]["seconds"] = time.perf_counter() - started
        write_json_atomically(args.json_path, results, indent=1)
        print(f"{name}: {results[name]}", flush=True)
    results["complete"] = True
    write_json_atomically(args.json_path, results, indent=1)
    return results


if __name__ == "__main__":
    main()
