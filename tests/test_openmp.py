"""OpenMP's barrier spin: the nmsparse command shortens it before torch loads, and never overrides the user's."""

import os
import subprocess
import sys

import pytest

from nmcli.runtime.openmp import SPIN_COUNT, USER_SETTINGS, setting, spin_briefly

ENTRY = """
import os, sys
sys.argv = ["nmsparse", "--version"]
from nmcli.__main__ import main
try:
    main()
except SystemExit:
    pass
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"))
"""


def _entry_point_sees(**settings: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS} | settings
    done = subprocess.run([sys.executable, "-c", ENTRY], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-2:]


def test_the_command_shortens_the_spin_before_torch_loads():
    assert _entry_point_sees() == [str(SPIN_COUNT), "None"]


@pytest.mark.parametrize("name, value", [("GOMP_SPINCOUNT", "50"), ("OMP_WAIT_POLICY", "ACTIVE")])
def test_a_wait_setting_of_the_user_is_kept(name, value):
    seen = dict(zip(("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"), _entry_point_sees(**{name: value})))
    assert seen == {name: value, **{other: "None" for other in USER_SETTINGS if other != name}}


def test_too_late_once_torch_is_loaded(monkeypatch):
    for name in USER_SETTINGS:  # set, then removed: monkeypatch restores what was there, nothing leaks out
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert "torch" in sys.modules  # the test session has loaded it: libgomp has read its settings already
    assert spin_briefly() is False and "GOMP_SPINCOUNT" not in os.environ
    assert setting() == "OpenMP defaults"
    monkeypatch.delitem(sys.modules, "torch")
    assert spin_briefly() is True and os.environ["GOMP_SPINCOUNT"] == str(SPIN_COUNT)
    assert setting() == f"GOMP_SPINCOUNT={SPIN_COUNT}"
