"""`--data writer:FOLDER:N`: a causal LM writes N texts for any student, so an encoder too recovers with no data set.

The writer continues prompts that span many topics and forms (statements, questions, short sentences, paragraphs,
lists, dialogue, code), or `--prompts FILE`, by the same seeded sampling and cache as `teacher:N`
(data/teacher.py); its sequences are decoded to text, which the student tokenizes as documents of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nmcli.errors import NMSparseError

PREFIX = "writer:"
MAX_TEXTS = 1_000_000
PROMPTS = (
    # statements and paragraphs across topics
    "The history of the Roman Empire", "Climate change affects farmers because", "A good night's sleep",
    "The stock market fell sharply today after", "Photosynthesis is the process by which", "Our village has a small",
    "The World Cup final was", "Vaccines work by", "The city council voted to", "Jazz music began in",
    "The recipe calls for two cups of flour and", "Volcanoes form when", "My grandmother always said that",
    "The new smartphone features", "Tourists visiting Japan should", "The hospital announced that",
    # questions and answers
    "Q: Why is the sky blue?\nA:", "How do I change a flat tire?", "What should I pack for a week in the mountains?",
    "Is it safe to eat raw eggs?", "Why do cats purr?", "Q: Who painted the Mona Lisa?\nA:",
    # short sentences
    "The train was late.", "She smiled.", "It rained all weekend.", "Prices went up again.",
    # lists
    "Five tips for saving money:\n1.", "Things to do in Paris:\n-", "Ingredients:\n-", "Steps to plant a tree:\n1.",
    # dialogue
    "\"Where were you last night?\" she asked.", "Customer: I'd like to return this jacket.\nClerk:",
    "Doctor: How are you feeling today?\nPatient:", "Interviewer: Tell me about yourself.\nCandidate:",
    # letters, reviews, instructions
    "Dear Sir or Madam,", "I give this restaurant three stars because", "To reset your password,",
    # code
    "def fibonacci(n):", "SELECT name, price FROM products WHERE", "// A function that sorts an array",
)


@dataclass(frozen=True)
class WriterSpec:
    folder: Path
    count: int


def writer_spec(spec: str) -> WriterSpec | None:
    """The writer's folder and N of `writer:FOLDER:N`, or None for any other data spec."""
    if not spec.startswith(PREFIX):
        return None
    folder, colon, count = spec[len(PREFIX) :].rpartition(":")
    if not colon or not folder or not count.isdigit() or not 1 <= int(count) <= MAX_TEXTS:
        raise NMSparseError(f"--data {spec}: write writer:FOLDER:N, a causal LM's folder and N from 1 to {MAX_TEXTS} texts")
    if not Path(folder).is_dir():
        raise NMSparseError(f"--data {spec}: {folder} is not a folder; the writer is a causal LM's Hugging Face folder")
    return WriterSpec(Path(folder), int(count))


def decoded_documents(tokenizer, sequences: list) -> list[str]:  # noqa: ANN001 - a transformers tokenizer
    """The writer's sequences as text, one document each (special tokens dropped, blank texts left out)."""
    texts = tokenizer.batch_decode([list(map(int, s)) for s in sequences], skip_special_tokens=True)
    return [text.strip() for text in texts if text.strip()]
