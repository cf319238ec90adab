"""README's two set-up commands and CI must not drift apart."""

import re

from tests.conftest import ROOT


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    install, test = _bash_blocks(readme)[:2]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, "the README's test command must appear as a line of .ci/run"
    venv, pip_install = install.split(" && ")[:2]  # CI installs exactly as the README's first command does
    assert venv in ci and pip_install in ci
