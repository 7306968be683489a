"""The command line: help, the demo's exact-posterior sections, one-line errors."""

import subprocess
import sys

from vi_toolkit.cli import main
from vi_toolkit.demo import SECTIONS


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "vi_toolkit", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "usage: vi-toolkit" in out and "demo" in out


def test_bad_input_is_one_line_not_a_traceback(capsys, tmp_path):
    assert main(["demo", "--device", "tpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vi-toolkit demo: error: unknown device 'tpu'") and "Traceback" not in err


def test_demo_sections_agree_with_the_closed_forms():
    for section in SECTIONS:
        title, rows = section(seed=0, device="cpu", quick=True)
        for name, fitted, exact in rows:
            tolerance = 0.1 if name.startswith("corr") else 0.05 * max(abs(exact), 0.1)
            assert abs(fitted - exact) < tolerance, (title, name, fitted, exact)
