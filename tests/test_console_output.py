"""Lines that scripts and logs read are never broken, whatever the terminal or file (issue 29, section 2).

The commands run through the real entry point in a fresh interpreter, once with stdout and stderr redirected to
files and once in a pseudo-terminal 40 columns wide, with output paths far longer than either width.
"""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from tests.conftest import save_tiny_hf

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def long_paths(tmp_path_factory):
    """A tiny Llama, and an output path of over 250 characters beside it."""
    root = tmp_path_factory.mktemp("console")
    source = save_tiny_hf(root / "llama", "llama")
    folder = root / ("a-folder-name-long-enough-to-be-wrapped-" * 5)
    folder.mkdir()
    return source, folder / "pruned-to-two-of-four"


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "nmcli", *map(str, args)]


def _environment() -> dict[str, str]:
    """No width from the environment: the width is the terminal's own (or none, for a file)."""
    return {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"TERM": "xterm"}


def _in_terminal(args: list[str], columns: int = 40) -> tuple[int, list[str]]:
    """Run in a pseudo-terminal `columns` wide (stdin, stdout and stderr); its lines without escape codes."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=_environment())
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    code = proc.wait(timeout=300)
    text = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    return code, [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]


def test_result_line_redirected_to_a_file_is_one_line_and_no_bar_is_drawn(long_paths, tmp_path):
    source, out = long_paths
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("w") as o, stderr.open("w") as e:
        code = subprocess.run(_command("prune", source, "-p", "2:4", "-o", out), stdout=o, stderr=e, env=_environment()).returncode
    assert code == 0, stderr.read_text()
    lines = stdout.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pruned 14 layers to 2:4") and lines[0].endswith(f"-> {out}")
    assert len(lines[0]) > 250
    assert stderr.read_text() == ""  # a progress bar is drawn on a terminal only
    with stderr.open("w") as e:
        again = subprocess.run(_command("prune", source, "-p", "2:4", "-o", out), stdout=subprocess.DEVNULL, stderr=e,
                               env=_environment())
    assert again.returncode == 2
    error = stderr.read_text().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {out}") and error[0].endswith("choose another --out")


def test_result_and_error_lines_are_whole_in_a_narrow_terminal(long_paths, tmp_path):
    source, _ = long_paths
    out = long_paths[1].with_name("in-a-terminal")
    code, lines = _in_terminal(_command("prune", source, "-p", "2:4", "-o", out))
    assert code == 0, lines
    assert any(line.startswith("pruned 14 layers to 2:4") and line.endswith(f"-> {out}") for line in lines), lines
    code, lines = _in_terminal(_command("prune", source, "-p", "2:4", "-o", out))
    assert code == 2
    assert any(line.startswith(f"error: {out}") and line.endswith("choose another --out") for line in lines), lines
    code, lines = _in_terminal(_command("report", out, "--check", "2:4"))
    assert code == 0, lines
    summary = [line for line in lines if line.startswith("params ")]
    assert len(summary) == 1 and "overall sparsity" in summary[0], lines  # one line, not folded at 40 columns
