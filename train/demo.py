"""Load an exported folder the way a user would and show what it learned: a sample and a few words' senses.

    python train/demo.py outputs/nano/model [--prompt "The history of"] [--words science,king,water]

The folder is loaded through ``pipeline("text-generation", trust_remote_code=True)``, exactly as from the Hub.
For a Backpack, each sense ``l`` of a word ``x`` is read as the vocabulary direction ``E C(x)[l]`` (the paper's
section on reading senses): its highest-scoring words.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import pipeline

from backpack.loading import no_loading_progress_bar


def sense_top_words(model, tokenizer, word: str, senses: int, top: int) -> list[str]:
    """One line per sense: the top words of ``E C(x)[l]`` for the first subword of `` word``."""
    token_id = tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = model.sense_logits([token_id])[0]  # (num_senses, vocab)
    logits = logits[:, : len(tokenizer)]  # the padded vocabulary rows are no words
    lines = []
    for sense in range(min(senses, logits.shape[0])):
        words = [tokenizer.decode([i]).strip() or repr(tokenizer.decode([i])) for i in logits[sense].topk(top).indices]
        lines.append(f"  sense {sense:2d}: {', '.join(words)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path")
    parser.add_argument("--prompt", default="The history of")
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--words", default="science,war,music")
    parser.add_argument("--senses", type=int, default=4, help="Senses shown per word.")
    parser.add_argument("--top", type=int, default=8, help="Words shown per sense.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model_path):
        sys.exit(f"error: no model folder at {args.model_path}")

    torch.manual_seed(args.seed)
    with no_loading_progress_bar():
        generator = pipeline("text-generation", model=args.model_path, trust_remote_code=True, device="cpu")
    room = generator.model.config.n_positions - len(generator.tokenizer(args.prompt)["input_ids"])
    sample = generator(args.prompt, max_new_tokens=max(1, min(args.max_new_tokens, room)), do_sample=True, top_k=40,
                       return_full_text=True)[0]["generated_text"]
    print(f"Sample ({type(generator.model).__name__}, loaded with pipeline):\n  {sample!r}\n")
    if not hasattr(generator.model, "sense_logits"):
        print("(not a Backpack: no senses to show)")
        return
    for word in args.words.split(","):
        print(f"Top words of the first {args.senses} senses of '{word}':")
        print("\n".join(sense_top_words(generator.model, generator.tokenizer, word.strip(), args.senses, args.top)))


if __name__ == "__main__":
    main()
