"""The model card (README.md): Hub metadata with a model-index of the run's measured results, and the text.

Only validation that measured something is reported: a run whose validation covered zero tokens (loss 0,
perplexity exp(0) = 1.0), or recorded none, gets no model-index entry and no perplexity.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from backpack.loading import count_parameters

from .checkpoint import Checkpoint

DEFAULT_LICENSE = "apache-2.0"
CARD_TAGS = ["backpack", "gpt2", "sense-vectors", "interpretability", "custom_code", "text-generation"]
EMBEDDED_CORPUS = "the package's embedded offline corpus (gensim's Wikipedia sample + the Lee news corpus)"

CITATION = """\
@inproceedings{hewitt-etal-2023-backpack,
    title = "Backpack Language Models",
    author = "Hewitt, John and Thickstun, John and Manning, Christopher D. and Liang, Percy",
    booktitle = "Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics
                 (Volume 1: Long Papers)",
    year = "2023",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2023.acl-long.506",
    pages = "9103--9125",
}"""


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def _text(value) -> str:
    """A recorded value as plain text in the card: HTML and markdown in it are shown, never rendered.

    The values come from the checkpoint's ``training_args.json``, which anyone can write: ``<img src=...>`` or a
    link in a dataset name must not become part of the page, and a ``|`` must not split a table row.
    """
    text = " ".join(str(value).split())  # one line: a newline would end the table row
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(text, quote=False))


def _code(value) -> str:
    """A recorded value set in code type, as text (a backtick span would still split a table row at a ``|``)."""
    return f"<code>{_text(value)}</code>"


def _number(value, spec: str = "") -> str:
    """A recorded number formatted with ``spec``; anything else shown as text."""
    return format(value, spec) if _is_number(value) else _text(value)


def python_string(value: str) -> str:
    """``value`` as a double-quoted Python string literal that no quote or backtick in it can end early
    (it goes into the card's code blocks: a revision with quotes must not break out of the snippet)."""
    return json.dumps(value).replace("`", "\\u0060")


def _fmt_int(value) -> str:
    return f"{int(value):,}" if _is_number(value) else "not recorded"


def _fmt_duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "not recorded"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _hub_dataset_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub dataset id (``openwebtext``, ``owner/name``), not a local path."""
    if not name or os.path.exists(os.path.expanduser(name)):
        return None
    return name if re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name) else None


def describe_data(args: dict) -> tuple[str, str, str | None]:
    """(prose, short name, Hub dataset id or None) for the run's training data."""
    dataset, files = args.get("dataset"), args.get("data_files")
    if dataset:
        hub_id = _hub_dataset_id(dataset)
        config = f" ({_text(args['dataset_config'])})" if args.get("dataset_config") else ""
        shown = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if hub_id else _code(Path(str(dataset)).name)
        return f"{shown}{config}", (hub_id or Path(str(dataset)).name), hub_id
    if files:
        files = files if isinstance(files, list) else [files]
        names = ", ".join(_code(Path(str(f)).name) for f in files[:5]) + (" ..." if len(files) > 5 else "")
        return f"local text files ({names})", "local text files", None
    if args:
        return EMBEDDED_CORPUS, "embedded offline corpus", None
    return "not recorded", "training data", None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measured_validation(metrics: dict, prefix: str = "") -> tuple[float | None, float] | None:
    """``(loss, perplexity)`` of a validation that really measured something, else None.

    A validation over zero tokens (an empty split, or one shorter than a block) averages nothing: loss 0 and
    perplexity exp(0) = 1.0, a perfect score that was never measured. The run's token count
    (``<prefix>val_tokens``) says so when recorded; without it, that exact signature is taken for one.

    Args:
        prefix: ``""`` for the final validation, ``"start_"`` for the one before training.
    """
    loss, perplexity = metrics.get(f"{prefix}val_loss"), metrics.get(f"{prefix}val_perplexity")
    tokens = metrics.get(f"{prefix}val_tokens")
    if not _is_number(perplexity):
        return None
    if tokens is not None and not (_is_number(tokens) and tokens > 0):
        return None
    if tokens is None and perplexity == 1.0 and loss in (None, 0):
        return None
    return (float(loss) if _is_number(loss) else None), float(perplexity)


def _zero_token_validation(metrics: dict, prefix: str = "") -> bool:
    """Whether the run recorded a validation result that measured no tokens (see `measured_validation`)."""
    return f"{prefix}val_perplexity" in metrics and measured_validation(metrics, prefix) is None


def eval_results(checkpoint: Checkpoint, data_name: str, data_id: str | None) -> list[EvalResult]:
    """The run's measured validation results as model-index entries (none when nothing was measured)."""
    measured = measured_validation(checkpoint.metrics)
    if measured is None:
        return []
    loss, perplexity = measured
    common = dict(task_type="text-generation", task_name="Language modeling", dataset_type=data_id or "local",
                  dataset_name=data_name, dataset_split="validation")
    results = [EvalResult(metric_type="perplexity", metric_name="Validation perplexity",
                          metric_value=round(perplexity, 4), **common)]
    if loss is not None:
        results.append(EvalResult(metric_type="loss", metric_name="Validation loss (nats/token)",
                                  metric_value=round(loss, 4), **common))
    return results


def _usage_section(repo_id: str, revision: str | None) -> str:
    rev = f", revision={python_string(revision)}" if revision and revision != "main" else ""
    repo_id = python_string(repo_id)
    return f"""\
## How to use

The model code travels with the weights (`configuration_backpack_gpt2.py`, `modeling_backpack_gpt2.py`), so
loading with transformers alone needs `trust_remote_code=True`, which runs that code: read it first.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({repo_id}{rev}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained({repo_id}{rev})
```

With the `backpack-gpt2` package installed, its own classes load the same weights without running the repo's
code: `model, tokenizer = backpack.load_model({repo_id}{rev})`.

### Generate

```python
from transformers import pipeline

generator = pipeline("text-generation", model={repo_id}{rev}, trust_remote_code=True)
print(generator("The river bank", max_new_tokens=30, do_sample=True, top_p=0.9)[0]["generated_text"])
```

### Read the senses of a word

Each word has `k` sense vectors; sense `l` of word `x` pushes every prediction along `E·C(x)[l]`, so its top
words describe it:

```python
ids = tokenizer(" bank").input_ids                         # a word = its first (here only) subword
top = model.sense_logits(ids)[0].topk(5, dim=-1).indices   # (senses, 5): each sense's top words
for sense, words in enumerate(top):
    print(sense, tokenizer.convert_ids_to_tokens(words))
```

`model(..., output_contextualization=True, output_senses=True)` also returns the weights `α` and the senses
`C(x)`, and `model.set_sense_edit(token_id, senses)` replaces a word's senses in every context.
"""


def _training_section(checkpoint: Checkpoint, data_prose: str) -> str:
    args, metrics = checkpoint.training_args, checkpoint.metrics
    if not args and not metrics and checkpoint.step is None:
        return "## Training details\n\nThe checkpoint carries no record of its training run.\n"
    rows: list[tuple[str, str]] = [("Data", data_prose)]
    max_steps = args.get("max_steps")
    step_text = _fmt_int(checkpoint.step)
    if checkpoint.step is not None and _is_number(max_steps) and max_steps:
        step_text += f" of {int(max_steps):,} scheduled"
    if metrics.get("stopped_by"):
        step_text += f" (stopped early by {_text(metrics['stopped_by'])})"
    rows.append(("Optimizer steps", step_text))
    rows.append(("Training tokens", _fmt_int(checkpoint.tokens)))
    if checkpoint.tokens and checkpoint.step:
        per_step = f"{checkpoint.tokens // checkpoint.step:,} tokens per optimizer step"
    else:
        per_step = f"{_fmt_int(args.get('tokens_per_step'))} tokens per optimizer step (target)"
    if args.get("batch_size"):
        accumulation = args.get("gradient_accumulation_steps")
        per_step += f"; {_text(args['batch_size'])} sequences of {_text(args.get('n_positions', '?'))} tokens per " \
                    f"device per micro-batch, gradient accumulation " \
                    f"{_text(accumulation) if accumulation else 'derived from it'}"
    rows.append(("Batch", per_step))
    if "learning_rate" in args:
        rows.append(("Schedule", f"peak learning rate {_number(args['learning_rate'], 'g')}, "
                                 f"{_fmt_int(args.get('warmup_steps'))} warm-up steps, then "
                                 f"{_code(args.get('lr_scheduler', 'linear'))} decay to step {_fmt_int(max_steps)}"))
        rows.append(("Optimizer", f"AdamW (β1 {_text(args.get('adam_beta1', 0.9))}, β2 "
                                  f"{_text(args.get('adam_beta2', 0.999))}, "
                                  f"ε {_number(args.get('adam_epsilon', 1e-8), 'g')}), weight decay "
                                  f"{_text(args.get('weight_decay', 0))} on matrices only, gradient "
                                  f"clipping {_text(args.get('max_grad_norm', 'none'))}, dropout "
                                  f"{_text(args.get('dropout', 'not recorded'))}, seed {_text(args.get('seed', '?'))}"))
    precision = metrics.get("mixed_precision") or args.get("mixed_precision")
    rows.append(("Precision", f"mixed precision {_code(precision)}" if precision and precision != "no"
                 else "fp32" if precision == "no" else "Accelerate's configured default (not recorded)"))
    hardware = metrics.get("hardware") or args.get("hardware") or ("CPU" if args.get("cpu") else None)
    processes = metrics.get("num_processes") or args.get("num_processes")
    rows.append(("Hardware", _text(hardware) + (f", {_text(processes)} process(es)" if processes else "") if hardware
                 else (f"{_text(processes)} process(es)" if processes else "not recorded")))
    time_text = _fmt_duration(metrics.get("wall_seconds") or metrics.get("train_seconds"))
    if metrics.get("train_seconds") and metrics.get("wall_seconds"):
        time_text += f" wall clock ({_fmt_duration(metrics['train_seconds'])} in the training loop)"
    if _is_number(metrics.get("tokens_per_second")):
        time_text += f", {metrics['tokens_per_second']:,.0f} tokens/s"
    rows.append(("Time", time_text))
    if metrics.get("start_step"):
        rows.append(("Resumed", f"from step {_fmt_int(metrics['start_step'])}"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    note = "" if checkpoint.metrics_are_current else (
        f"\n\nThe run's arguments come from `{checkpoint.run_file}`, written at another step than these weights; "
        "the results below are therefore not recorded for this checkpoint.")
    return (f"## Training details\n\nTrained with the `backpack-gpt2` package (`train/pretrain.py`): the paper's "
            f"recipe, AdamW with warm-up and decay, next-token cross-entropy.\n\n| | |\n|---|---|\n{table}{note}\n")


def _evaluation_section(checkpoint: Checkpoint, data_prose: str) -> str:
    metrics = checkpoint.metrics

    def row(label: str, loss, perplexity) -> str:
        cells = [format(v, f) if isinstance(v, (int, float)) else "–" for v, f in ((loss, ".4f"), (perplexity, ".2f"))]
        return f"| {label} | {cells[0]} | {cells[1]} |"

    empty = " (0 tokens: the validation split is empty or shorter than one block)"
    rows = []
    if (start := measured_validation(metrics, "start_")) is not None:
        rows.append(row("validation, before training", *start))
    if (final := measured_validation(metrics)) is not None:
        rows.append(row("validation, these weights", *final))
    elif _zero_token_validation(metrics):
        rows.append(f"| validation, these weights | not measured{empty} | – |")
    elif rows:
        rows.append("| validation, these weights | not measured (the run stopped before its next evaluation) | – |")
    if _is_number(metrics.get("train_loss")):
        rows.append(row("training batch, last step", metrics["train_loss"], None))
    if not rows:
        if _zero_token_validation(metrics) or _zero_token_validation(metrics, "start_"):
            return f"## Evaluation\n\nNo validation was measured for these weights{empty}.\n"
        return "## Evaluation\n\nNo evaluation was recorded for these weights.\n"
    return (f"## Evaluation\n\nNext-token loss (nats per token) and perplexity on the held-out validation split of "
            f"{data_prose}, as the training run measured them.\n\n| | loss | perplexity |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _limitations_section(checkpoint: Checkpoint, data_prose: str) -> str:
    config = checkpoint.model.config
    tokens = f"{checkpoint.tokens:,} tokens of " if checkpoint.tokens else ""
    return f"""\
## Limitations

- A research model trained on {tokens}{data_prose} only, with no instruction tuning and no safety filtering.
  It reproduces the biases of its data; the paper measures gender bias in profession words and shows how
  editing a single sense reduces it, which does not make the model unbiased.
- It reads at most {config.n_positions} tokens. The vocabulary is GPT-2's 50,257 subwords padded to
  {config.vocab_size:,}; the padding ids are never seen in training.
- Senses are learned without supervision: which sense index means what differs from run to run, and a sense
  that reads well through its top words may still do other things in context.
- Loading runs the repository's Python code (`trust_remote_code=True`): read it, or pin a `revision`.
"""


def _summary_section(checkpoint: Checkpoint, model_name: str) -> str:
    config = checkpoint.model.config
    rows = [
        ("Parameters", f"{count_parameters(checkpoint.model):,} (tied embeddings counted once)"),
        ("Senses per word (k)", str(config.num_senses)),
        ("Width / layers / heads", f"{config.n_embd} / {config.n_layer} / {config.n_head}"),
        ("Context", f"{config.n_positions} tokens"),
        ("Vocabulary", f"{config.vocab_size:,} (GPT-2 byte-level BPE)"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""\
# {model_name}

A **Backpack language model** ([Hewitt, Thickstun, Manning & Liang, ACL 2023](https://aclanthology.org/2023.acl-long.506)):
every word has {config.num_senses} non-contextual *sense vectors* `C(x)`; a GPT-2 Transformer only decides how to
weight them, `o_i = Σ_j Σ_l α[l, i, j] C(x_j)[l]`, and the logits are `E o_i`. Because the output is linear in
the senses, a sense can be read off through the vocabulary and edited to change predictions in every context.

| | |
|---|---|
{table}
"""


def build_model_card(checkpoint: Checkpoint, repo_id: str, revision: str | None = None,
                     license: str | None = None) -> ModelCard:
    """The README.md: metadata (license, library, pipeline, tags, datasets, language, model-index) and text.

    An existing card of the checkpoint keeps its text; its metadata gains what the Hub needs and the run's results.
    """
    model_name = repo_id.split("/")[-1]
    data_prose, data_name, data_id = describe_data(checkpoint.training_args)
    results = eval_results(checkpoint, data_name, data_id)
    existing = checkpoint.card
    if existing is not None:
        data = existing.data
        data.license = license or data.license or DEFAULT_LICENSE
        data.library_name = "transformers"
        data.pipeline_tag = "text-generation"
        data.tags = list(dict.fromkeys([*(data.tags or []), *CARD_TAGS]))
        data.language = data.language or "en"
        if data_id:
            data.datasets = list(dict.fromkeys([*(data.datasets or []), data_id]))
        if results:
            data.model_name = data.model_name or model_name
            data.eval_results = results
        elif _zero_token_validation(checkpoint.metrics):  # an older entry would now describe unmeasured weights
            data.eval_results = None
        return existing

    data = ModelCardData(
        model_name=model_name if results else None, license=license or DEFAULT_LICENSE, library_name="transformers",
        pipeline_tag="text-generation", tags=list(CARD_TAGS), language="en",
        datasets=[data_id] if data_id else None, metrics=["perplexity"] if results else None,
        eval_results=results or None,
    )
    sections = [
        _summary_section(checkpoint, model_name),
        _usage_section(repo_id, revision),
        _training_section(checkpoint, data_prose),
        _evaluation_section(checkpoint, data_prose),
        _limitations_section(checkpoint, data_prose),
        f"## Citation\n\n```bibtex\n{CITATION}\n```\n",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections))
