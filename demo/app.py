"""Browser demo of a Backpack language model: explore senses, explain predictions, steer generation.

    python demo/app.py [MODEL_FOLDER] [--port 7860] [--host 127.0.0.1]

MODEL_FOLDER is any exported Backpack folder, or a Hub id such as ``stanfordnlp/backpack-gpt2`` (default:
``outputs/nano/model``, what the README's main command ``bash scripts/quickstart.sh`` trains). The page has three
tabs:

* Senses: a word -> each sense's top and bottom words (E·C(x)[ℓ]), one row per sense.
* Explain: a sentence -> the next-word distribution at a position, α per sense, and the (context word, sense)
  contributions that sum to a target word's logit.
* Steer: a prompt -> two generations with the same seed, without and with a topic or a sense intervention.

Everything the page computes comes from the `backpack` toolkit; this file only lays it out. Bad input (an empty
box, an unknown word, a sentence longer than the model reads) is shown as a message in the page.
"""

from __future__ import annotations

import argparse
import functools
import html
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, before gradio is imported


import gradio as gr
import matplotlib
import torch

matplotlib.use("Agg")

from backpack import plots
from backpack.explain import encode_text, explain_prediction
from backpack.interventions import scale_sense
from backpack.loading import load_model
from backpack.senses import read_senses, readable_vocab_size
from backpack.topic import TOPIC_BAGS, TopicController, bag_token_ids, generate, topic_thresholds

LOGGER = logging.getLogger("backpack.demo")

DEFAULT_MODEL = Path("outputs") / "nano" / "model"  # what `bash scripts/quickstart.sh` exports, from the clone
"""The folder `bash scripts/quickstart.sh` (the README's main command) exports."""

MAX_TEXT_CHARS = 2000
"""Longest text a box accepts; the model's own limit (n_positions tokens) is checked separately."""

TOPIC_SAMPLE_SIZE = 1024
"""Words sampled to estimate a topic's quantiles (the toolkit's `sample_size`); computed once per topic."""

CUSTOM_TOPIC = "(custom words below)"

INTRO = """
# Backpack language model explorer

A **Backpack** predicts the next word from a weighted sum of *sense vectors*. Every word `x` of the vocabulary has
`k` senses `C(x)[ℓ]`, the same in every context; a Transformer only decides the non-negative weights `α` with which
the senses of the words seen so far are summed. So a sense can be **read** (the words it pushes up and down,
`E·C(x)[ℓ]`), a prediction can be **explained** exactly (which word's which sense added how much), and generation
can be **steered** (scale a sense, or up-weight the senses that point at a topic).
"""

CSS = """
.bp-table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
.bp-table th, .bp-table td { border: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }
.bp-table th { background: #f3f4f6; }
.bp-chip { display: inline-block; margin: 1px 3px 1px 0; padding: 0 5px; border-radius: 4px; white-space: pre; }
.bp-top { background: #dcfce7; }
.bp-bottom { background: #fee2e2; }
.bp-num { font-variant-numeric: tabular-nums; color: #555; font-size: 0.85em; }
.bp-bar { display: inline-block; height: 0.8em; background: #60a5fa; vertical-align: middle; }
#sense-status p, #explain-status p, #steer-status p { margin: 0; }
"""


# --- formatting helpers --------------------------------------------------------------------------------------


def _token_label(token: str) -> str:
    """A token as shown in a cell: spaces kept (shown as-is, `white-space: pre`), blank tokens as their repr."""
    return token if token.strip() else repr(token)


def _chips(words: Sequence[tuple[str, float]], css_class: str) -> str:
    """Words with their logits as coloured chips."""
    return " ".join(
        f'<span class="bp-chip {css_class}" title="{html.escape(repr(t))} {v:+.3f}">{html.escape(_token_label(t))}'
        f' <span class="bp-num">{v:+.2f}</span></span>'
        for t, v in words
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="bp-table" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def error_message(error: Exception) -> str:
    """The text shown in the page for a failed request (never a traceback)."""
    if isinstance(error, ValueError):
        return f"⚠️ **Input problem:** {error}"
    return f"⚠️ **Internal error** ({type(error).__name__}): {error}. The details are in the server's log."


def shows_errors(outputs: int) -> Callable[[Callable], Callable]:
    """Wrap a handler returning `outputs` values (the last one a status message) so exceptions become a message.

    ValueError (what the toolkit raises for bad input) is shown as an input problem; anything else is logged with
    its traceback on the server and shown as a one-line internal error. The other outputs are cleared.
    """

    def decorate(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def wrapped(*args):
            try:
                return handler(*args)
            except Exception as error:  # noqa: BLE001 - the page must show a message, whatever went wrong
                if not isinstance(error, ValueError):
                    LOGGER.exception("demo handler %s failed", handler.__name__)
                return (None,) * (outputs - 1) + (error_message(error),)

        return wrapped

    return decorate


def _require_text(text: str | None, what: str) -> str:
    """`text` unless it is empty or blank (ValueError naming `what`)."""
    if text is None or not text.strip():
        raise ValueError(f"please enter {what}")
    return text


def _as_int(value: float | int | None, what: str) -> int:
    """A number box's value as an int (ValueError if it is empty or not whole)."""
    if value is None or float(value) != int(value):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


# --- the three panels ----------------------------------------------------------------------------------------


class DemoHandlers:
    """The page's callbacks for one model; each returns its outputs and a status message (Markdown)."""

    def __init__(self, model, tokenizer, topic_sample_size: int = TOPIC_SAMPLE_SIZE):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.topic_sample_size = topic_sample_size
        self._thresholds: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def num_senses(self) -> int:
        return int(self.model.config.num_senses)

    # Senses -------------------------------------------------------------------------------------------------

    def senses(self, word: str, top_k: float) -> tuple[str, str]:
        """A word -> (HTML grid: one row per sense with its top and bottom words, status)."""
        word = _require_text(word, "a word").strip()
        readout = read_senses(self.model, [word], self.tokenizer, top_k=_as_int(top_k, "words per sense"))
        resolved = readout.words[0]
        rows = [
            [f"<b>{sense}</b>", f'<span class="bp-num">{float(readout.norms[0, s]):.2f}</span>',
             _chips(readout.top[0][s], "bp-top"), _chips(readout.bottom[0][s], "bp-bottom")]
            for s, sense in enumerate(readout.senses)
        ]
        grid = _table(["sense", "‖C(x)[ℓ]‖", "top words (pushed up)", "bottom words (pushed down)"], rows,
                      "sense-table")
        status = (f"Senses of {html.escape(resolved.describe(readout.policy))} (token ids {list(resolved.token_ids)}):"
                  f" each row lists the words whose logits sense ℓ raises most and lowers most, in every context.")
        return grid, status

    # Explain ------------------------------------------------------------------------------------------------

    def _context_ids(self, text: str) -> torch.Tensor:
        """The sentence's token ids, or ValueError if it is empty or longer than the model reads."""
        ids = encode_text(_require_text(text, "a sentence"), self.tokenizer, self.model.config.vocab_size)
        limit = int(self.model.config.n_positions)
        if ids.numel() > limit:
            raise ValueError(f"the sentence has {ids.numel()} tokens; this model reads at most {limit}")
        return ids

    def _next_word_table(self, ids: torch.Tensor, position: int, count: int) -> tuple[str, int]:
        """(HTML table of the `count` likeliest next tokens after position `position`, the likeliest token id)."""
        with torch.no_grad():
            logits = self.model(ids[None].to(self.model.device), use_cache=False).logits[0, position].float()
        probs = torch.softmax(logits, dim=-1)[: readable_vocab_size(self.model, self.tokenizer)]
        values, indices = probs.topk(count)
        rows = [
            [str(rank), f'<span class="bp-chip bp-top">{html.escape(_token_label(self.tokenizer.decode([int(i)])))}'
             f"</span>", f'<span class="bp-num">{float(p):.4f}</span> '
             f'<span class="bp-bar" style="width:{max(1, round(200 * float(p)))}px"></span>']
            for rank, (p, i) in enumerate(zip(values, indices), start=1)
        ]
        return _table(["rank", "next token", "probability"], rows, "next-table"), int(indices[0])

    def explain(self, text: str, position: float, target: str, count: float):
        """A sentence -> (tokens, next-word table, α figure, contribution table, contribution figure, status)."""
        ids = self._context_ids(text)
        position = _as_int(position, "position")
        if not -ids.numel() <= position < ids.numel():
            raise ValueError(f"position {position} is out of range: the sentence has tokens 0..{ids.numel() - 1}"
                             " (negative positions count from the end)")
        next_table, likeliest = self._next_word_table(ids, position, 10)
        chosen = target.strip() if target and target.strip() else likeliest
        e = explain_prediction(self.model, ids, chosen, position, self.tokenizer)
        tokens = " ".join(
            f'<span class="bp-chip {"bp-top" if j == e.position else ""}"><span class="bp-num">{j}</span> '
            f"{html.escape(_token_label(t))}</span>" for j, t in enumerate(e.tokens)
        )
        rows = [
            [str(rank), str(j), html.escape(_token_label(token)), str(sense),
             f"{float(e.contextualization[sense, e.position, j]):.4f}", f"{value:+.4f}"]
            for rank, (j, token, sense, value) in enumerate(e.top(_as_int(count, "rows")), start=1)
        ]
        contributions = _table(["rank", "position", "context word", "sense", "α", "contribution"], rows,
                               "contribution-table")
        target_label = e.target.describe("first") if isinstance(chosen, str) else repr(self.tokenizer.decode([chosen]))
        target_name = html.escape(target_label)
        status = (f"Predicting the token after position {e.position} ({html.escape(repr(e.tokens[e.position]))})."
                  f" Target {target_name}: logit {e.value:+.4f} = sum of {e.contributions.numel()} contributions"
                  f" {e.total:+.4f}; log p = {e.log_prob:+.4f} (p = {math.exp(e.log_prob):.3g}).")
        alpha_figure = plots.plot_contextualization(e.contextualization, e.tokens)
        alpha_figure.set_layout_engine("constrained")  # no overlapping labels between the per-sense panels
        contribution_figure = plots.plot_contributions(e)
        contribution_figure.axes[0].set_title(f"Contributions to the logit of {target_label} (sum {e.total:+.3f})",
                                              fontsize=9)
        return tokens, next_table, alpha_figure, contributions, contribution_figure, status

    # Steer --------------------------------------------------------------------------------------------------

    def _pair(self, prompt: str, max_new_tokens: float, seed: float, controller: TopicController | None = None,
              intervention: Callable | None = None) -> tuple[str, str]:
        """(plain generation, generation with `controller` / inside `intervention()`), both with the same seed."""
        prompt = _require_text(prompt, "a prompt")
        kwargs = {"max_new_tokens": _as_int(max_new_tokens, "new tokens"), "seed": _as_int(seed, "seed")}
        plain = generate(self.model, self.tokenizer, prompt, **kwargs)
        if intervention is None:
            steered = generate(self.model, self.tokenizer, prompt, controller=controller, **kwargs)
        else:
            with intervention():
                steered = generate(self.model, self.tokenizer, prompt, **kwargs)
        return prompt + plain.text, prompt + steered.text

    def _bag(self, topic: str, custom_words: str) -> list[int]:
        """The topic's token ids: the custom words (comma-separated) or the paper's bag called `topic`."""
        if topic == CUSTOM_TOPIC or not topic:
            words = [w.strip() for w in (custom_words or "").split(",") if w.strip()]
            if not words:
                raise ValueError("please enter some topic words (comma-separated) or choose a topic")
        elif topic in TOPIC_BAGS:
            words = list(TOPIC_BAGS[topic])
        else:
            raise ValueError(f"unknown topic {topic!r}")
        return bag_token_ids(words, self.tokenizer, self.model.config.vocab_size)

    def steer_topic(self, prompt: str, max_new_tokens: float, seed: float, topic: str, custom_words: str,
                    strength: float) -> tuple[str, str, str]:
        """A prompt -> (plain, topic-controlled, status)."""
        _require_text(prompt, "a prompt")
        bag = self._bag(topic, custom_words)
        key = tuple(bag)
        if key not in self._thresholds:
            self._thresholds[key] = topic_thresholds(self.model, bag, self.topic_sample_size, progress=False)
        controller = TopicController(self.model, bag, _as_int(strength, "strength"), thresholds=self._thresholds[key],
                                     progress=False)
        plain, steered = self._pair(prompt, max_new_tokens, seed, controller=controller)
        words = ", ".join(repr(self.tokenizer.decode([i])) for i in bag)
        status = f"Topic bag {html.escape(words)} at strength {controller.strength} (same seed on both sides)."
        return plain, steered, status

    def steer_sense(self, prompt: str, max_new_tokens: float, seed: float, word: str, sense: float,
                    scale: float) -> tuple[str, str, str]:
        """A prompt -> (plain, with sense ℓ of `word` scaled by `scale`, status)."""
        _require_text(prompt, "a prompt")
        word = _require_text(word, "a word to intervene on").strip()
        sense = _as_int(sense, "sense")
        readout = read_senses(self.model, [word], self.tokenizer, top_k=6, senses=[sense])
        plain, steered = self._pair(
            prompt, max_new_tokens, seed,
            intervention=lambda: scale_sense(self.model, word, sense, float(scale), tokenizer=self.tokenizer))
        pushes = ", ".join(repr(t) for t, _ in readout.top[0][0])
        status = (f"Sense {sense} of {html.escape(readout.words[0].describe(readout.policy))} scaled by {scale:g}"
                  f" (it pushes up {html.escape(pushes)}); same seed on both sides.")
        return plain, steered, status


# --- layout --------------------------------------------------------------------------------------------------


def _senses_tab(handlers: DemoHandlers) -> None:
    gr.Markdown("Type a word: each row is one of its senses, with the words it pushes up and down in *every* context.")
    with gr.Row():
        word = gr.Textbox(label="Word", value="science", max_length=100, elem_id="sense-word", scale=3)
        top_k = gr.Slider(1, 20, value=6, step=1, label="Words per sense", elem_id="sense-topk", scale=2)
        button = gr.Button("Show senses", variant="primary", elem_id="sense-button", scale=1)
    status = gr.Markdown(elem_id="sense-status")
    grid = gr.HTML(elem_id="sense-grid")
    handler = shows_errors(2)(handlers.senses)
    for event in (button.click, word.submit):
        event(handler, [word, top_k], [grid, status])


def _explain_tab(handlers: DemoHandlers) -> None:
    gr.Markdown("Type a sentence and pick a position: the model's next-word distribution there, the weights α with"
                " which each sense reads the context, and the (context word, sense) pairs that add up to a target"
                " word's logit. Leave the target empty to explain the likeliest next token.")
    with gr.Row():
        text = gr.Textbox(label="Sentence", value="The history of science is", max_length=MAX_TEXT_CHARS,
                          elem_id="explain-text", scale=4)
        position = gr.Number(label="Position (-1 = last token)", value=-1, precision=0, elem_id="explain-position")
        target = gr.Textbox(label="Target word (optional)", max_length=100, elem_id="explain-target")
        count = gr.Slider(3, 30, value=10, step=1, label="Contributions shown", elem_id="explain-count")
    button = gr.Button("Explain", variant="primary", elem_id="explain-button")
    status = gr.Markdown(elem_id="explain-status")
    tokens = gr.HTML(label="Tokens", elem_id="explain-tokens")
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("**Next-word distribution**")
            next_words = gr.HTML(elem_id="explain-next")
        with gr.Column(scale=2):
            gr.Markdown("**Top contributions to the target's logit** (α · E_target·C(x_j)[ℓ])")
            table = gr.HTML(elem_id="explain-contributions")
    gr.Markdown("**Contributions** of every (sense, context word) pair to the target's logit: red raises it, blue"
                " lowers it")
    contributions_plot = gr.Plot(show_label=False, elem_id="explain-contrib-plot")
    gr.Markdown("**α per sense**: row i is the query (predicting token i+1), column j the context word whose sense"
                " is weighted")
    alpha_plot = gr.Plot(show_label=False, elem_id="explain-alpha")
    handler = shows_errors(6)(handlers.explain)
    for event in (button.click, text.submit, target.submit):
        event(handler, [text, position, target, count], [tokens, next_words, alpha_plot, table, contributions_plot,
                                                          status])


def _steer_tab(handlers: DemoHandlers) -> None:
    gr.Markdown("Type a prompt, then generate it twice with the same seed: as is, and with a topic or a sense"
                " intervention.")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value="The history of", max_length=MAX_TEXT_CHARS, elem_id="steer-prompt",
                            scale=4)
        max_new = gr.Slider(5, 80, value=30, step=1, label="New tokens", elem_id="steer-tokens")
        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="steer-seed")
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Topic control** (the paper's 17 bags of words, or your own)")
            topic = gr.Dropdown([CUSTOM_TOPIC, *TOPIC_BAGS], value="sports", label="Topic", elem_id="steer-topic")
            custom = gr.Textbox(label="Custom topic words (comma-separated)", max_length=500, elem_id="steer-custom")
            strength = gr.Slider(0, 3, value=2, step=1, label="Strength (0 = off)", elem_id="steer-strength")
            topic_button = gr.Button("Generate with topic", variant="primary", elem_id="steer-topic-button")
        with gr.Column():
            gr.Markdown("**Sense intervention** (scale one sense of one word, in every context)")
            word = gr.Textbox(label="Word", value="science", max_length=100, elem_id="steer-word")
            sense = gr.Number(label=f"Sense (0..{handlers.num_senses - 1})", value=0, precision=0,
                              elem_id="steer-sense")
            scale = gr.Slider(-2, 10, value=0, step=0.5, label="Scale γ (0 removes the sense)", elem_id="steer-scale")
            sense_button = gr.Button("Generate with sense intervention", variant="primary",
                                     elem_id="steer-sense-button")
    status = gr.Markdown(elem_id="steer-status")
    with gr.Row():
        plain = gr.Textbox(label="Without", lines=6, interactive=False, elem_id="steer-plain")
        steered = gr.Textbox(label="With", lines=6, interactive=False, elem_id="steer-steered")
    common = [prompt, max_new, seed]
    topic_button.click(shows_errors(3)(handlers.steer_topic), [*common, topic, custom, strength],
                       [plain, steered, status])
    sense_button.click(shows_errors(3)(handlers.steer_sense), [*common, word, sense, scale], [plain, steered, status])


def describe_model(model, name: str = "") -> str:
    """One line about the loaded model."""
    config = model.config
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    where = f"`{name}`: " if name else ""
    return (f"Model {where}{parameters / 1e6:.1f}M parameters, {config.n_layer} layers, {config.n_embd} dimensions,"
            f" **{config.num_senses} senses** per word, {config.vocab_size} vocabulary entries, reads up to"
            f" {config.n_positions} tokens.")


def build_app(model, tokenizer, name: str = "", topic_sample_size: int = TOPIC_SAMPLE_SIZE) -> gr.Blocks:
    """The demo's page for a loaded Backpack and its tokenizer (not launched). Requests are served one at a time,
    since interventions change the model while they run."""
    handlers = DemoHandlers(model, tokenizer, topic_sample_size)
    with gr.Blocks(title="Backpack explorer", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        gr.Markdown(describe_model(model, name), elem_id="model-info")
        with gr.Tabs():
            with gr.Tab("Senses", id="senses", elem_id="tab-senses"):
                _senses_tab(handlers)
            with gr.Tab("Explain", id="explain", elem_id="tab-explain"):
                _explain_tab(handlers)
            with gr.Tab("Steer", id="steer", elem_id="tab-steer"):
                _steer_tab(handlers)
    app.queue(default_concurrency_limit=1)
    return app


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts: nothing to fetch, not even the bundled web fonts."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "DejaVu Sans", "sans-serif"],
                             font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"])


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> str:
    """Serve `app` locally (no share link, no analytics, the theme's bundled fonts); returns the page's URL.

    Quiet: Gradio's own banner would suggest ``share=True``, which this demo never uses; :func:`main` prints the URL.
    """
    _, url, _ = app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                           quiet=True, show_error=False, css=CSS, theme=theme(),
                           footer_links=[], ssr_mode=False, mcp_server=False, pwa=False)
    return url


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Browser demo of a Backpack language model.")
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                        help="exported Backpack folder or Hub id (default: outputs/nano/model, from"
                             " `bash scripts/quickstart.sh`)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.model == str(DEFAULT_MODEL) and not DEFAULT_MODEL.exists():
        print(f"No model at {DEFAULT_MODEL}.\nTrain the nano Backpack first with the README's main command"
              " (`bash scripts/quickstart.sh`), or pass an exported folder: python demo/app.py path/to/model",
              file=sys.stderr)
        return 2
    try:
        # By folder or Hub id, with the installed Backpack classes (the checkpoint's own code is never run).
        model, tokenizer = load_model(args.model, require_backpack=True)
    except (OSError, ValueError) as error:
        print(f"Could not load a Backpack from {args.model!r}: {error}", file=sys.stderr)
        return 2
    print(f"Starting the Backpack explorer on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    launch(build_app(model, tokenizer, name=args.model), args.host, args.port, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
