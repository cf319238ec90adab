"""`nmsparse eval`'s service: the quality of one checkpoint, against its dense teacher where one is given."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from nmcli.data.images import MNIST5K, load_data
from nmcli.data.text import NEWS, PYTHON_HELP
from nmcli.errors import NMSparseError
from nmcli.models.architecture import ModelKind, data_config, model_kind
from nmcli.models.resolve import Resolved, load_model, resolve
from nmcli.quality.measures import accuracy
from nmcli.quality.text_data import check_seq_len, text_data
from nmcli.train.distributed import DistEnv


@dataclass
class EvalResult:
    source: str
    kind: ModelKind
    data: str
    metrics: dict[str, float]
    teacher: dict[str, float] | None  # the dense model's own figures where they mean something (perplexity)
    seconds: float

    def to_json(self) -> dict:
        return {"source": self.source, "kind": self.kind.value, "data": self.data, "metrics": self.metrics,
                "teacher": self.teacher, "seconds": self.seconds}


def _teacher_of(spec: str | None, student: Resolved, device: torch.device) -> tuple[Resolved, nn.Module] | None:
    if spec is None:
        return None
    resolved = resolve(spec)
    if resolved.model is None or student.model is None or resolved.model.name != student.model.name:
        raise NMSparseError(f"--teacher {spec}: not the same architecture as the model ({student.model.name if student.model else '?'})")
    return resolved, load_model(resolved).to(device).eval()


def evaluate_source(
    source: str, *, data: str | None = None, teacher: str | None = None, seq_len: int | None = None,
    device: torch.device = torch.device("cpu"), eval_data: tuple[str, ...] = (),
) -> EvalResult:
    """The quality of a checkpoint on held-out data (methods.md §6): see the module docstring for the metrics."""
    started = time.perf_counter()
    resolved = resolve(source)
    if resolved.model is None:
        raise NMSparseError(f"{source}: the architecture is unknown; eval needs a file written by nmsparse or a Hugging Face folder")
    kind = model_kind(resolved.model)
    if teacher is None and kind in (ModelKind.ENCODER, ModelKind.SEQUENCE_CLASSIFIER):
        raise NMSparseError(f"{source}: the quality of a {kind.value} is its agreement with the dense model: pass --teacher DENSE")
    model, dense = load_model(resolved).to(device).eval(), _teacher_of(teacher, resolved, device)
    if kind is ModelKind.IMAGE_CLASSIFIER:
        if eval_data:
            raise NMSparseError("--eval-data goes with Hugging Face models (held-out text); an image classifier is scored on --data")
        splits = load_data(data or MNIST5K, data_config(model, resolved.model))
        loader = DataLoader(splits.val, batch_size=256)
        metrics = {"val_accuracy": accuracy(model, loader, DistEnv())}
        reference = {"val_accuracy": accuracy(dense[1], loader, DistEnv())} if dense else None
        return EvalResult(source, kind, splits.description, metrics, reference, round(time.perf_counter() - started, 2))
    seq_len = check_seq_len(resolved, seq_len)
    folder = resolved.checkpoint.folder or (dense[0].checkpoint.folder if dense else None)
    texts = text_data(kind, folder, data or PYTHON_HELP, seq_len, dense[1] if dense else None, with_train=False,
                      eval_specs=(NEWS, *eval_data))
    metrics = texts.quality(model)
    reference = texts.quality(dense[1]) if dense and kind is ModelKind.CAUSAL_LM else None
    return EvalResult(source, kind, texts.quality.description, metrics, reference, round(time.perf_counter() - started, 2))
