"""Text for calibration, distillation and evaluation: files, folders, JSON Lines, or Python's own help texts.

`--data` forms:
- `python-help` (built in): the English help texts shipped with every Python (`pydoc_data.topics`), one document
  per topic, sorted by name;
- a `.txt` / `.md` file (one document per paragraph) or a folder of them (one document per file, sorted by name,
  regular files only);
- a `.jsonl` file with a string `text` field on every line.
Documents are split deterministically: every HELDOUT_EVERY-th document (counting from the HELDOUT_OFFSET-th) is
held out, the rest is for training. No randomness, so every seed sees the same split.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nmcli.errors import NMSparseError

PYTHON_HELP = "python-help"
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
    path = Path(spec)
    if path.is_dir():
        return _folder(path), str(path)
    if not path.is_file():
        raise NMSparseError(f"--data {spec}: no such file or folder (or use the built-in '{PYTHON_HELP}')")
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
