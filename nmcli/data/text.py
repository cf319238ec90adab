"""Text for calibration, distillation and evaluation: files, folders, JSON Lines, or Python's own help texts.

`--data` forms:
- `python-help` (built in): the English help texts shipped with every Python (`pydoc_data.topics`), one document
  per topic, sorted by name;
- `news` (built in, for evaluation): 350 paragraphs of ABC news from 2001-2002, the corpus of Lee, Pincombe and
  Welsh (2005) that gensim's wheel ships as test data: general English that no built-in training text overlaps;
- `wiki` (built in, for training): the English Wikipedia articles (CC BY-SA) of gensim's test data, one document
  per article, markup removed by gensim's own wiki filter;
- a `.txt` / `.md` file (one document per paragraph) or a folder of them (one document per file, sorted by name,
  regular files only);
- a `.jsonl` file with a string `text` field on every line.
Documents are split deterministically: every HELDOUT_EVERY-th document (counting from the HELDOUT_OFFSET-th) is
held out, the rest is for training. No randomness, so every seed sees the same split. A set given only for
evaluation (`--eval-data`, the built-in `news`) is held out whole.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from nmcli.errors import NMSparseError

PYTHON_HELP = "python-help"
NEWS = "news"  # the built-in general-domain evaluation set
NEWS_FILES = ("lee_background.cor", "lee.cor")
WIKI = "wiki"  # the built-in general-domain training text
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_WORDS = 8  # shorter blocks are headings, captions and list debris of the markup
WIKI_QUOTES = re.compile("'{2,}")  # wiki markup for italics (two quotes) and bold (three): gensim's filter keeps it
TEXT_SUFFIXES = (".txt", ".md")
HELDOUT_EVERY, HELDOUT_OFFSET = 4, 3
MAX_TEXT_BYTES = 1 << 30  # a text corpus beyond 1 GiB is not what this tool tokenizes in memory
MIN_SENTENCE_WORDS = 4
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


@dataclass(frozen=True)
class TextCorpus:
    train: list[str]
    heldout: list[str]
    description: str


def paragraphs(document: str) -> list[str]:
    """Blank-line separated blocks, each joined into one line of words (help texts are wrapped at 70 columns)."""
    blocks = (" ".join(block.split()) for block in _PARAGRAPH_BREAK.split(document))
    return [block for block in blocks if block]


def sentences(paragraph: str) -> list[str]:
    """Sentences of at least MIN_SENTENCE_WORDS words (a plain split after . ! ? before a capital)."""
    return [s for s in _SENTENCE_END.split(paragraph) if len(s.split()) >= MIN_SENTENCE_WORDS]


def _python_help() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise NMSparseError("--data python-help: this Python has no pydoc_data module; give a text file instead") from None
    return [topics[key] for key in sorted(topics)]


def _gensim_data(name: str, files: tuple[str, ...]) -> Path:
    """The folder of gensim's test data in the installed wheel (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise NMSparseError(f"'{name}': the built-in text ships in the gensim wheel: pip install -c constraints.txt 'nmsparse[data]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    missing = [file for file in files if not (folder / file).is_file()]
    if missing:
        raise NMSparseError(f"'{name}': {folder / missing[0]} is missing from the installed gensim; reinstall it")
    return folder


def _news() -> list[str]:
    """One document per line of the Lee corpus files."""
    folder = _gensim_data(NEWS, NEWS_FILES)
    text = "\n".join((folder / name).read_bytes().decode("latin-1") for name in NEWS_FILES)  # lee.cor is Latin-1 (a £)
    return [line.strip() for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def _wiki() -> tuple[str, ...]:
    """One document per article (meta pages left out), its blocks of at least WIKI_MIN_WORDS words as paragraphs;
    gensim parses the dump and strips the markup (its bold and italic quotes are dropped here)."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(_gensim_data(WIKI, (WIKI_FILE,)) / WIKI_FILE) as dump:
        articles = [filter_wiki(text) for title, text, _ in extract_pages(dump) if ":" not in title]
    documents = []
    for article in articles:
        blocks = (" ".join(WIKI_QUOTES.sub("", block).split()) for block in _PARAGRAPH_BREAK.split(article))
        kept = [block for block in blocks if len(block.split()) >= WIKI_MIN_WORDS]
        if kept:
            documents.append("\n\n".join(kept))
    return tuple(documents)


def read_text(path: Path) -> str:
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise NMSparseError(f"{path}: larger than {MAX_TEXT_BYTES >> 30} GiB; split it or sample it first")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise NMSparseError(f"{path}: binary data (NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NMSparseError(f"{path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None


def _jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NMSparseError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise NMSparseError(f'{path}: line {number} has no string "text" field')
        texts.append(record["text"])
    return texts


def _folder(folder: Path) -> list[str]:
    files = sorted(p for p in folder.iterdir() if p.suffix in TEXT_SUFFIXES and p.is_file() and not p.is_symlink())
    if not files:
        raise NMSparseError(f"{folder}: no {' / '.join(TEXT_SUFFIXES)} files (symlinks are not followed)")
    return [read_text(p) for p in files]


def _documents(spec: str) -> tuple[list[str], str]:
    if spec == PYTHON_HELP:
        return _python_help(), "Python's help texts (pydoc_data.topics)"
    if spec == NEWS:
        return _news(), "ABC news paragraphs (the Lee corpus, gensim's test data)"
    if spec == WIKI:
        return list(_wiki()), "English Wikipedia articles (gensim's test data)"
    path = Path(spec)
    if path.is_dir():
        return _folder(path), str(path)
    if not path.is_file():
        raise NMSparseError(f"--data {spec}: no such file or folder (or use the built-in '{PYTHON_HELP}', '{WIKI}' or '{NEWS}')")
    if path.suffix == ".jsonl":
        return _jsonl(path), str(path)
    if path.suffix in TEXT_SUFFIXES:
        return paragraphs(read_text(path)), str(path)
    raise NMSparseError(f"--data {spec}: expected a .txt / .md / .jsonl file, a folder of them, or '{PYTHON_HELP}'")


def load_texts(spec: str) -> TextCorpus:
    """Documents of `spec`, split into train and held-out parts (both non-empty)."""
    documents, where = _documents(spec)
    documents = [d for d in documents if d.strip()]
    if len(documents) < 2:
        raise NMSparseError(f"{where}: {len(documents)} non-empty document(s); at least 2 are needed to hold one out")
    heldout = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY == HELDOUT_OFFSET % len(documents)]
    train = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY != HELDOUT_OFFSET % len(documents)]
    return TextCorpus(train, heldout, f"{where} ({len(train)} train / {len(heldout)} held-out documents)")


def load_eval_texts(spec: str) -> TextCorpus:
    """Every document of `spec`, held out whole: a set given only for evaluation."""
    documents, where = _documents(spec)
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise NMSparseError(f"--eval-data {spec}: no text in it (every document is empty)")
    return TextCorpus([], documents, f"{where} ({len(documents)} documents)")
