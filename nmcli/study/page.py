"""What both results pages are made of: mean ± std over seeds, markdown table rows, a saved plot, and paths that
hold on another machine."""

from __future__ import annotations

import shlex
import site
import statistics
import sysconfig
from pathlib import Path

from nmcli.io.atomic import atomic_output

GRADIENT_FLOW = ("mdgf-linear", "mdgf-exponential", "sdgf-stepwise", "sdgf-geometric", "mdgf-sdgf")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table_head(columns: list[str]) -> list[str]:
    """A markdown table's first two lines: the recipe column, then `columns`."""
    return ["| recipe | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]


def table_row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def save_plot(fig, ax, path: Path, xlabel: str, ylabel: str) -> str:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_output(path, force=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path.name


def portable_path(path: str | Path, cwd: Path | None = None) -> str:
    """`path` as a page may show it on any machine: inside an installed package (a pretrained model shipped in a
    wheel), found through that package by a shell expression; inside the working folder, relative to it; anywhere
    else, only its name (an absolute path names one machine's folders)."""
    resolved, here = Path(path).absolute(), (cwd or Path.cwd()).absolute()
    for site_dir in _site_packages():
        if resolved.is_relative_to(site_dir) and len(resolved.relative_to(site_dir).parts) > 1:
            package, *rest = resolved.relative_to(site_dir).parts
            if package.isidentifier() and (site_dir / package / "__init__.py").is_file():
                finder = f"import {package}, os; print(os.path.dirname({package}.__file__))"
                return f"\"$(python -c '{finder}')\"/" + shlex.quote("/".join(rest))
    if resolved.is_relative_to(here):
        return shlex.quote(str(resolved.relative_to(here)))
    return shlex.quote(resolved.name)


def _site_packages() -> list[Path]:
    """Where installed packages live in this interpreter (a virtual environment's own, then the system's)."""
    folders = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")] + site.getsitepackages()
    return [Path(folder).absolute() for folder in dict.fromkeys(folders)]
