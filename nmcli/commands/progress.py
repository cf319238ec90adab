"""Progress on stderr: bars over tensors, bytes or blocks, and the training reporter. Drawn on a terminal only."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nmcli.commands.common import err, is_main_rank


def progress_bar(enabled: bool, unit: str = "tensors") -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if unit in ("tensors", "blocks") else TextColumn("{task.percentage:>5.1f}%"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[item]}", style="dim", markup=False),
        console=err,
        transient=True,
        disable=not (enabled and err.is_terminal),  # a log or a pipe gets no bar (not even its last newline)
    )


def with_byte_progress(label: str, infos: dict, enabled: bool, work):  # noqa: ANN001, ANN201
    """Run `work(progress)` under a bar measured in bytes of the source checkpoint."""
    with progress_bar(enabled, unit="bytes") as bar:
        task = bar.add_task(label, total=sum(i.nbytes for i in infos.values()), item="")
        return work(lambda name, n: bar.update(task, advance=n, item=name))


class RichReporter:
    """Renders training progress: a bar with loss, phase, pattern and alpha; messages on their own lines."""

    def __init__(self, enabled: bool, messages: bool):
        self.enabled = enabled and is_main_rank()
        self.messages = messages and is_main_rank()
        self.bar: Progress | None = None
        self.task = None

    def start(self, total_steps: int, first_step: int, description: str) -> None:
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]:.4f} | {task.fields[phase]} {task.fields[pattern]}"),
            console=err, transient=True, disable=not (self.enabled and err.is_terminal),
        )
        self.bar.start()
        self.task = self.bar.add_task(description, total=total_steps, completed=first_step, loss=0.0, phase="", pattern="")

    def step(self, step: int, values: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step + 1, loss=values["loss"], phase=values["phase"], pattern=values["pattern"])

    def message(self, text: str) -> None:
        if self.messages:
            self._print(text)

    def warn(self, text: str) -> None:
        """On stderr even under --quiet / --json (their stdout stays clean): what the user must know to act."""
        if is_main_rank():
            self._print(text)

    def _print(self, text: str) -> None:
        (self.bar.console if self.bar is not None else err).print(text, highlight=False)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
