"""``backpack`` command line: read senses, explain predictions, intervene, steer generation, evaluate.

    backpack senses MODEL WORD... [--top 5] [--png senses.png]
    backpack explain MODEL TEXT --target WORD [--contrast WORD] [--png contributions.png] [--alpha-png alpha.png]
    backpack intervene MODEL PROMPT --scale WORD:SENSE:GAMMA --edit WORD:OLD:NEW [--generate 30]
    backpack generate MODEL PROMPT [--topic arts_culture | --bag word,word] [--strength 2]
    backpack bias MODEL [--sense 10]
    backpack similarity MODEL [--rg65 FILE] [--simverb FILE]

MODEL is a folder exported by the trainer (or saved with `save_pretrained`). Words are strings (read with GPT-2's
leading space, " word"; a word typed with its leading space is taken as written) or token ids written ``#123``.

Bad input (an empty prompt, an unknown word, an invalid ``#id``, a missing output folder, a malformed ratings
file, ...) is refused before the model is loaded where it can be, with a message and exit status 2; a limit the
model imposes (more words than the vocabulary, more new tokens than the positions left) is applied and stated on
stderr. A tool whose optional library is missing exits with status 1 and the pip command that installs it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

from ._optional import MissingExtraError
from .corpora import gensim_test_file
from .words import SUBWORD_POLICIES, check_finite, load_model, parse_word_arg


def _int_at_least(minimum: int):
    """argparse type: an integer >= `minimum`, refused with a message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from error
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _probability(text: str) -> float:
    """argparse type: a nucleus-sampling mass in (0, 1] (NaN, inf and 0 would silently break sampling)."""
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from error
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _device(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``xpu``)."""
    expected = f"expected a torch device such as cpu, cuda, cuda:1 or mps, got {text!r}"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise argparse.ArgumentTypeError(expected) from error
    if device.type == "cpu":
        return text
    backend = {"cuda": torch.cuda, "mps": getattr(torch, "mps", None), "xpu": getattr(torch, "xpu", None)}.get(
        device.type)
    if backend is None:
        raise argparse.ArgumentTypeError(expected)
    try:
        count = backend.device_count() if device.type == "mps" or backend.is_available() else 0
    except (AssertionError, RuntimeError):  # a torch built without that backend
        count = 0
    if count == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no {device.type.upper()} device that torch can "
                                         "use; use --device cpu")
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} {device.type.upper()} device(s), "
                                         f"{device.type}:0 to {device.type}:{count - 1}")
    return text


def _note(args, message: str) -> None:
    """A stated adjustment (the command still runs), on stderr so that stdout stays the result."""
    print(f"backpack {args.command}: note: {message}", file=sys.stderr)


def _check_text(text: str, what: str = "prompt") -> str:
    """`text` unless it is empty or blank: refused before the model is loaded (the model cannot take 0 tokens)."""
    if not text.strip():
        raise ValueError(f"empty {what} {text!r}: give some text")
    return text


def _check_figure_paths(*paths: str | None) -> None:
    """Refuse unwritable figure paths (and a missing matplotlib) before any work, so that nothing is written."""
    given = [path for path in paths if path is not None]
    if given:
        from .plots import check_output_path

        for path in given:
            check_output_path(path)


def _scale_spec(text: str) -> tuple[str | int, int, float]:
    """``WORD:SENSE:GAMMA`` -> (word, sense, γ)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--scale wants WORD:SENSE:GAMMA, got {text!r}")
    try:
        return parse_word_arg(parts[0]), int(parts[1]), float(parts[2])
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--scale wants WORD:SENSE:GAMMA, got {text!r} ({error})") from error


def _edit_spec(text: str) -> tuple[str | int, str | int, str | int]:
    """``WORD:OLD:NEW`` -> (word, removed, added)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--edit wants WORD:OLD:NEW, got {text!r}")
    try:
        word, old, new = (parse_word_arg(p) for p in parts)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--edit wants WORD:OLD:NEW, got {text!r} ({error})") from error
    return word, old, new


def _scales_spec(text: str) -> list[float]:
    """``START:STOP:STEP`` (inclusive) or ``a,b,c`` -> the γ grid (at most `MAX_SCALES` values)."""
    from .bias import MAX_SCALES

    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not all(math.isfinite(x) for x in (start, stop, step)) or step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            if count > MAX_SCALES:  # refused before a list of that many floats is built
                raise argparse.ArgumentTypeError(
                    f"{text!r} makes {count:,} scales; at most {MAX_SCALES:,} (use a larger STEP)")
            return [round(start + i * step, 10) for i in range(count)]
        scales = [float(x) for x in text.split(",") if x]
        if not scales or not all(math.isfinite(x) for x in scales) or len(scales) > MAX_SCALES:
            raise ValueError
        return scales
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--scales wants START:STOP:STEP or a,b,c; got {text!r}") from error


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (exported by the trainer / save_pretrained)")
    parser.add_argument("--device", default="cpu", type=_device, help="torch device (default cpu)")


def _add_interventions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=_scale_spec, action="append", default=[], metavar="WORD:SENSE:GAMMA",
                        help="scale sense SENSE of WORD by GAMMA in every context (0 removes it); repeatable")
    parser.add_argument("--edit", type=_edit_spec, action="append", default=[], metavar="WORD:OLD:NEW",
                        help="knowledge edit: move OLD's component of WORD's senses onto NEW; repeatable")


def _add_subword(parser: argparse.ArgumentParser, choices: Sequence[str] = SUBWORD_POLICIES,
                 default: str = "average") -> None:
    parser.add_argument("--subword", choices=list(choices), default=default,
                        help=f"a word of several subwords: its first subword or their average (default {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backpack", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    senses = commands.add_parser("senses", help="top/bottom words of every sense of some words")
    _add_model(senses)
    senses.add_argument("words", nargs="+", help="words (or #token_id)")
    senses.add_argument("--top", type=_positive_int, default=5,
                        help="words per sense (default 5; more than the vocabulary lists all of it)")
    senses.add_argument("--senses", type=int, nargs="+", help="only these sense indices")
    senses.add_argument("--no-bottom", action="store_true", help="omit the most negative words")
    senses.add_argument("--png", help="also save the table as a PNG")
    _add_subword(senses)

    explain = commands.add_parser("explain", help="decompose a next-word logit into (word, sense) contributions")
    _add_model(explain)
    explain.add_argument("text")
    explain.add_argument("--target", required=True, help="the next word to explain (or #token_id)")
    explain.add_argument("--contrast", help="explain logit(target) - logit(contrast) instead")
    explain.add_argument("--position", type=int, default=-1, help="query position (default -1: after the text)")
    explain.add_argument("--top", type=_positive_int, default=10, help="contributors to print (default 10)")
    explain.add_argument("--png", help="save the contribution heatmap (senses x words)")
    explain.add_argument("--alpha-png", help="save α heatmaps (one per sense) for the text")

    intervene = commands.add_parser("intervene", help="next-word distribution before/after sense interventions")
    _add_model(intervene)
    intervene.add_argument("prompt")
    _add_interventions(intervene)
    intervene.add_argument("--top", type=_positive_int, default=8,
                           help="next words to list (default 8; more than the vocabulary lists all of it)")
    intervene.add_argument("--generate", type=_non_negative_int, default=0, metavar="N",
                           help="also generate N tokens greedily before/after")
    _add_subword(intervene)

    generate = commands.add_parser("generate", help="generate text, optionally topic-controlled")
    _add_model(generate)
    generate.add_argument("prompt")
    from .topic import TOPIC_BAGS

    generate.add_argument("--topic", choices=sorted(TOPIC_BAGS), help="one of the paper's 17 topic bags")
    generate.add_argument("--bag", help="a custom bag: word,word,...")
    generate.add_argument("--strength", type=int, default=2, help="0 (none) .. 3 (default 2)")
    generate.add_argument("--no-anneal", action="store_true", help="turn off the annealing rule")
    generate.add_argument("--sample-size", type=_non_negative_int, default=4096,
                          help="words sampled to estimate the score quantiles (0 = whole vocabulary, exact)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=40,
                          help="tokens to generate (default 40; capped, with a note, at the positions the model has "
                               "left after the prompt)")
    generate.add_argument("--greedy", action="store_true", help="greedy decoding instead of nucleus sampling")
    generate.add_argument("--top-p", type=_probability, default=0.9, help="nucleus sampling mass in (0, 1]")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--compare", action="store_true", help="also print the uncontrolled generation")
    _add_interventions(generate)
    _add_subword(generate)

    bias = commands.add_parser("bias", help="gender-bias score: unmodified, sense removed, per-profession scale")
    _add_model(bias)
    bias.add_argument("--sense", type=int, default=10, help="the gender sense ℓ (10 for the published model)")
    bias.add_argument("--scales", type=_scales_spec, default=None, help="γ grid START:STOP:STEP (default 0:1:0.01)")
    bias.add_argument("--per-profession", action="store_true", help="also print every profession's numbers")
    bias.add_argument("--professions", help="comma-separated professions instead of the paper's 39")
    bias.add_argument("--name", default="model", help="model name for the table")
    _add_subword(bias)

    similarity = commands.add_parser("similarity", help="lexical similarity (Spearman), the paper's Table 4")
    _add_model(similarity)
    similarity.add_argument("--rg65", help="RG65 ratings file (w1 w2 score)")
    similarity.add_argument("--simverb", help="SimVerb-3500 file (w1 w2 POS score relation)")
    similarity.add_argument("--simlex", help="SimLex-999 file (default: gensim's copy)")
    similarity.add_argument("--wordsim", help="WordSim-353 file (default: gensim's copy)")
    similarity.add_argument("--name", default="model", help="model name for the table")
    _add_subword(similarity, (*SUBWORD_POLICIES, "both"), default="both")
    return parser


def _apply_interventions(model, tokenizer, args) -> list:
    from .interventions import knowledge_edit, scale_sense

    applied = []
    for word, sense, gamma in args.scale:
        applied.append(scale_sense(model, word, sense, gamma, tokenizer, args.subword))
    for word, old, new in args.edit:
        applied.append(knowledge_edit(model, word, old, new, tokenizer, args.subword))
    for intervention in applied:
        print(f"applied: {intervention.description}")
    return applied


def _note_top(args, vocab: int) -> None:
    if args.top > vocab:
        _note(args, f"--top {args.top} is more than the {vocab} words of the vocabulary; listing all {vocab}")


def run_senses(args) -> None:
    from .senses import format_readout, read_senses, readable_vocab_size

    words = [parse_word_arg(w) for w in args.words]
    _check_figure_paths(args.png)
    model, tokenizer = load_model(args.model, args.device)
    _note_top(args, readable_vocab_size(model, tokenizer))
    readout = read_senses(model, words, tokenizer, args.top, args.senses, args.subword)
    print(format_readout(readout, show_bottom=not args.no_bottom))
    if args.png:
        from .plots import plot_sense_readout, save_figure

        print(f"saved {save_figure(plot_sense_readout(readout, args.top), args.png)}")


def run_explain(args) -> None:
    from .explain import explain_prediction, format_explanation

    _check_text(args.text, "text")
    target = parse_word_arg(args.target)
    contrast = parse_word_arg(args.contrast) if args.contrast is not None else None
    _check_figure_paths(args.png, args.alpha_png)
    model, tokenizer = load_model(args.model, args.device)
    explanation = explain_prediction(model, args.text, target, args.position, tokenizer, contrast)
    print(format_explanation(explanation, args.top))
    if args.png or args.alpha_png:
        from .plots import plot_contextualization, plot_contributions, save_figure

        if args.png:
            print(f"saved {save_figure(plot_contributions(explanation), args.png)}")
        if args.alpha_png:
            figure = plot_contextualization(explanation.contextualization, explanation.tokens)
            print(f"saved {save_figure(figure, args.alpha_png)}")


def _next_words(model, tokenizer, ids: torch.Tensor, count: int) -> list[tuple[str, float]]:
    """The `count` most probable next words (all of the readable vocabulary at most) and their probabilities."""
    from .senses import readable_vocab_size
    from .words import check_finite_tensor

    with torch.no_grad():
        logits = model(ids[None].to(model.device), use_cache=False).logits[0, -1].float()
    check_finite_tensor("the model's next-word logits", logits)
    probs = torch.softmax(logits, dim=-1)[: readable_vocab_size(model, tokenizer)]
    values, indices = probs.topk(min(count, probs.numel()))
    return [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices)]


def _note_capped(args, flag: str, asked: int, used: int, prompt_tokens: int, model) -> None:
    if used < asked:
        _note(args, f"{flag} {asked} capped at {used}: the model has {model.config.n_positions} positions and the "
                    f"prompt takes {prompt_tokens} token(s)")


def run_intervene(args) -> None:
    from .interventions import remove_all_interventions
    from .senses import readable_vocab_size
    from .topic import generate

    _check_text(args.prompt)
    if not args.scale and not args.edit:
        raise ValueError("give at least one --scale WORD:SENSE:GAMMA or --edit WORD:OLD:NEW")
    model, tokenizer = load_model(args.model, args.device)
    ids = torch.tensor(tokenizer.encode(args.prompt, add_special_tokens=False))
    if ids.numel() == 0:
        raise ValueError(f"prompt {args.prompt!r} encodes to no tokens")
    _note_top(args, readable_vocab_size(model, tokenizer))
    before = _next_words(model, tokenizer, ids, args.top)
    greedy_before = generate(model, tokenizer, args.prompt, args.generate, do_sample=False) if args.generate else None
    _apply_interventions(model, tokenizer, args)
    after = _next_words(model, tokenizer, ids, args.top)
    greedy_after = generate(model, tokenizer, args.prompt, args.generate, do_sample=False) if args.generate else None
    remove_all_interventions(model)
    if greedy_before is not None:
        _note_capped(args, "--generate", args.generate, greedy_before.max_new_tokens, ids.numel(), model)
    print(f"prompt: {args.prompt!r}\n{'next word (before)':<28} {'p':>7}    {'next word (after)':<28} {'p':>7}")
    for (word_b, p_b), (word_a, p_a) in zip(before, after):
        print(f"{word_b!r:<28} {p_b:7.4f}    {word_a!r:<28} {p_a:7.4f}")
    if args.generate:
        print(f"greedy before: {args.prompt}{greedy_before.text!s}")
        print(f"greedy after:  {args.prompt}{greedy_after.text!s}")


def run_generate(args) -> None:
    from .topic import TOPIC_BAGS, TopicController, bag_token_ids, check_strength, generate

    _check_text(args.prompt)
    if args.topic and args.bag:
        raise ValueError("give --topic or --bag, not both")
    check_strength(args.strength)
    model, tokenizer = load_model(args.model, args.device)
    _apply_interventions(model, tokenizer, args)
    controller = None
    if args.topic or args.bag:
        words = TOPIC_BAGS[args.topic] if args.topic else [w.strip() for w in args.bag.split(",") if w.strip()]
        bag = bag_token_ids(words, tokenizer, model.config.vocab_size)
        sample = None if args.sample_size == 0 else args.sample_size
        controller = TopicController(model, bag, args.strength, anneal=not args.no_anneal, sample_size=sample,
                                     seed=args.seed)
        quantiles = "" if controller.thresholds is None else \
            ", score quantiles q.95/.80/.60 = " + "/".join(f"{float(t):.4f}" for t in controller.thresholds)
        print(f"topic {args.topic or 'custom'}: bag {words} -> tokens {[tokenizer.decode([i]) for i in bag]}; "
              f"strength {args.strength}, delta {tuple(round(d, 3) for d in controller.deltas.tolist())}, "
              f"annealing {'off' if args.no_anneal else 'on'}{quantiles}"
              f"{'' if sample is None else f' (estimated from {sample} sampled words)'}")
    kwargs = {"do_sample": not args.greedy, "top_p": args.top_p, "seed": args.seed}
    result = generate(model, tokenizer, args.prompt, args.max_new_tokens, controller, **kwargs)
    _note_capped(args, "--max-new-tokens", args.max_new_tokens, result.max_new_tokens, result.prompt_ids.numel(),
                 model)
    if args.compare and controller is not None:
        plain = generate(model, tokenizer, args.prompt, args.max_new_tokens, None, **kwargs)
        print(f"[uncontrolled] {args.prompt}{plain.text}")
        print(f"[strength {args.strength}]   {args.prompt}{result.text}")
    else:
        print(f"{args.prompt}{result.text}")
    if controller is not None:
        hits = sum(int(t) in set(controller.bag_ids) for t in result.new_ids)
        print(f"bag tokens generated: {hits} of {result.new_ids.numel()}")


def run_bias(args) -> None:
    from .bias import DEFAULT_SCALES, PROFESSIONS, evaluate_bias, format_bias_report

    professions = PROFESSIONS
    if args.professions is not None:
        professions = [p.strip() for p in args.professions.split(",")]
    model, tokenizer = load_model(args.model, args.device)
    report = evaluate_bias(model, tokenizer, args.sense, professions, scales=args.scales or DEFAULT_SCALES,
                           policy=args.subword)
    print(format_bias_report(report, args.name, args.per_profession))


def run_similarity(args) -> None:
    from .similarity import (
        evaluate_similarity,
        format_similarity_table,
        load_pairs,
        ordered_datasets,
    )

    # Every ratings file is read (and a malformed one refused, naming its line) before the model is loaded.
    paths = {"SimLex999": args.simlex or gensim_test_file("simlex999.txt"),
             "WordSim353": args.wordsim or gensim_test_file("wordsim353.tsv")}
    paths.update({name: path for name, path in (("RG65", args.rg65), ("SimVerb3500", args.simverb)) if path})
    pairs = {name: load_pairs(paths[name]) for name in ordered_datasets(paths)}
    model, tokenizer = load_model(args.model, args.device)
    policies = SUBWORD_POLICIES if args.subword == "both" else (args.subword,)
    for number, policy in enumerate(policies):
        if number:
            print()
        results = [evaluate_similarity(model, tokenizer, name, rated, policy) for name, rated in pairs.items()]
        print(format_similarity_table(results, policy, args.name))


COMMANDS = {"senses": run_senses, "explain": run_explain, "intervene": run_intervene, "generate": run_generate,
            "bias": run_bias, "similarity": run_similarity}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``backpack`` command; returns the exit status (2 on a bad input, 1 on a missing extra).

    Arguments argparse refuses (``--top-p nan``, ``--top 0``) exit with status 2 through SystemExit, as usual.
    """
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "strength", None) is not None:
            check_finite("strength", args.strength)
        COMMANDS[args.command](args)
    except MissingExtraError as error:
        print(f"backpack {args.command}: error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"backpack {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
