"""Real text and word-similarity data that ship inside gensim's wheel: no download, the same text everywhere.

The trainer's embedded offline corpus, the benchmark's token batches and the similarity evaluation all read their
files here, and the Wikipedia sample is turned into plain text in exactly one way, so that the benchmark times the
very text training sees.
"""

from __future__ import annotations

import bz2
import os
import re
from collections.abc import Iterator

from ._optional import import_optional

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"  # 106 Wikipedia articles
LEE_SAMPLE = "lee_background.cor"  # 300 news articles, one per line


def gensim_test_file(name: str) -> str:
    """Path of a file in gensim's shipped test data (``gensim/test/test_data/``).

    Raises:
        ImportError: naming the extra to install when gensim is missing.
        FileNotFoundError: when this gensim does not ship the file.
    """
    gensim = import_optional("gensim", f"{name} (shipped inside gensim's wheel)")
    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"this gensim installation does not ship {name} (looked at {path})")
    return path


def wiki_article_text(markup: str) -> str:
    """Plain text of one article's wiki markup: gensim's ``filter_wiki`` plus bold/italic quotes and headings."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = re.sub(r"'{2,}", "", text)  # ''italic'' and '''bold'''
    text = re.sub(r"^\s*=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)  # == Heading == -> Heading
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def wikipedia_articles() -> Iterator[tuple[str, str]]:
    """(title, plain text) of each article of gensim's Wikipedia sample.

    Redirects, non-article namespaces and stubs shorter than gensim's ``ARTICLE_MIN_WORDS`` are dropped, as
    gensim's own ``WikiCorpus`` does.
    """
    import_optional("gensim", "the Wikipedia sample")
    from gensim.corpora.wikicorpus import ARTICLE_MIN_WORDS, extract_pages

    with bz2.open(gensim_test_file(WIKI_SAMPLE), "rb") as dump:
        for title, markup, _page_id in extract_pages(dump, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = wiki_article_text(markup)
            if len(text.split()) >= ARTICLE_MIN_WORDS:
                yield title, text


def lee_documents() -> Iterator[str]:
    """The Lee background corpus: one news article per non-empty line."""
    with open(gensim_test_file(LEE_SAMPLE), encoding="utf-8", errors="replace") as corpus:
        yield from (line.strip() for line in corpus if line.strip())
