"""`nmsparse eval`: quality on held-out data — perplexity, embedding agreement with the dense model, accuracy."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nmcli.commands.common import DeviceOpt, EvalDataOpt, JsonOpt, QuietOpt, Source, out, print_json, user_errors
from nmcli.commands.progress import progress_bar


def evaluate(
    source: Source,
    data: Annotated[
        Optional[str],
        typer.Option("--data", help="held-out data: python-help (default for HF), .txt/.md/.jsonl, a folder; mnist5k or an image folder"),
    ] = None,
    teacher: Annotated[
        Optional[str], typer.Option("--teacher", help="the dense model: needed for encoders (embedding agreement)")
    ] = None,
    seq_len: Annotated[Optional[int], typer.Option(
        "--seq-len", min=8, help="tokens per held-out sample (HF models) [default: 128, or the model's positions if fewer]"
    )] = None,
    eval_data: EvalDataOpt = None,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quality on held-out data: perplexity (causal LMs), embedding cosine / Spearman to the teacher (encoders),
    accuracy (image classifiers)."""
    from nmcli.runtime.device import run_device
    from nmcli.quality.source import evaluate_source

    with user_errors():
        compute = run_device(device)
        with progress_bar(not (quiet or as_json)) as bar:
            bar.add_task("evaluating", total=None, item=source)
            result = evaluate_source(source, data=data, teacher=teacher, seq_len=seq_len, device=compute,
                                     eval_data=tuple(eval_data or ()))
    if as_json:
        print_json(result.to_json())
        return
    if not quiet:
        out.print(f"{result.source} ({result.kind.value}) on {result.data}")
    for name, value in result.metrics.items():
        dense = f" (dense {result.teacher[name]:.4f})" if result.teacher and name in result.teacher else ""
        out.print(f"{name} {value:.4f}{dense}")
