"""docs/language.md runs as written: its `python` blocks, then its `yaml` files and `bash` commands, in order,
in an empty folder; the `python skip` blocks (a real tokenizer, which needs its files) at least compile."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import ROOT

DOC = Path(ROOT) / "docs" / "language.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.S | re.M)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blocks():
    """(info string, body) of every fenced block of the page, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(DOC.read_text())]


def test_the_page_has_runnable_blocks_of_every_kind():
    kinds = [info for info, _ in blocks()]
    assert kinds.count("python") >= 2 and "yaml" in kinds and "bash" in kinds and "python skip" in kinds
    for info, body in blocks():
        if info == "yaml":
            assert re.match(r"# [\w.-]+\.yaml\n", body), body[:40]
        if info == "bash":
            assert all(line.startswith("metamoe ") for line in body.splitlines() if line.strip()), body


def test_skipped_blocks_compile():
    for info, body in blocks():
        if info == "python skip":
            compile(body, str(DOC), "exec")


def test_the_page_runs(tmp_path, monkeypatch, capsys):
    import yaml

    from metamoe.cli import main

    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_language"}
    ran = []
    for info, body in blocks():
        if info == "python":
            exec(compile(body, str(DOC), "exec"), namespace)
        elif info == "yaml":
            name = body.splitlines()[0][2:].strip()
            assert isinstance(yaml.safe_load(body), dict), name
            Path(name).write_text(body)
        elif info == "bash":
            for line in body.splitlines():
                if not line.strip():
                    continue
                capsys.readouterr()
                rc = main(shlex.split(line)[1:])
                out = capsys.readouterr()
                assert rc == 0, (line, out.err)
                ran.append((line, out.out))
    assert [line.split()[1] for line, _ in ran] == ["train-expert", "train-expert", "unify", "evaluate"]
    assert "next-token loss" in ran[-1][1]
    assert (tmp_path / "unified").is_dir() and (tmp_path / "packages" / "sailing").is_dir()
