"""The `metamoe` command line: the console script and `python -m metamoe` are the same program."""

import os
import subprocess
import sys

from conftest import ROOT


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "metamoe", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0
    for cmd in ("info", "demo"):
        assert cmd in out.stdout


def test_unknown_command_exits_2():
    out = _run("frobnicate")
    assert out.returncode == 2
    assert "unknown command 'frobnicate'" in out.stderr


def test_console_script_installed():
    script = os.path.join(os.path.dirname(sys.executable), "metamoe")
    assert os.path.exists(script), "the metamoe console script is not installed next to the interpreter"
    out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=300)
    from metamoe import __version__

    assert out.returncode == 0 and out.stdout.strip() == __version__


def test_select_help_names_the_canonical_methods_and_the_short_spellings():
    out = _run("select", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps the help
    assert "dpp, facility_location, top_relevance, random, facility_location_private" in text
    assert "fl = facility_location, topk = top_relevance, fl-private = facility_location_private" in text


def test_train_expert_help_names_the_canonical_methods():
    out = _run("train-expert", "--help")
    assert out.returncode == 0, out.stderr
    assert "facility_location" in out.stdout and "top_relevance" in out.stdout and "DATA =" in out.stdout
