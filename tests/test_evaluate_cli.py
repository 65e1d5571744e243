"""`metamoe evaluate`: class names per --data set, count mismatches, a folder without a finished result."""

import json

import numpy as np
import pytest
from test_unify_cli import work  # noqa: F401  (the module fixture: two packages + a unified model)

from metamoe.unify import cli as ucli
from metamoe.unify import evaluate_cli as evcli


def test_class_names_are_per_data_set(work, tmp_path, capsys):  # noqa: F811
    t, data = work
    b = data.clients[1]
    # the same test set twice: plain, and with labels renumbered 9 - y and named accordingly
    np.savez(tmp_path / "b.npz", x=b.x_test, y=b.y_test)
    np.savez(tmp_path / "b_rev.npz", x=b.x_test, y=9 - b.y_test)
    digits = ",".join(str(j) for j in range(10))
    reverse = ",".join(str(9 - j) for j in range(10))
    out = tmp_path / "res.json"
    argv = ["--model", str(t / "unified"), "--data", f"b={tmp_path / 'b.npz'}", "--class-names", digits,
            "--data", f"rev={tmp_path / 'b_rev.npz'}", "--class-names", reverse, "--json", str(out)]
    assert evcli.main_evaluate(argv) == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    model = ucli.load_unified(t / "unified")
    want = evcli.evaluate_model(model, b.x_test, b.y_test, [str(j) for j in range(10)])["accuracy"]
    assert res["b"]["accuracy"] == pytest.approx(want) and res["rev"]["accuracy"] == pytest.approx(want)
    # scored against the other set's names, the renumbered set would get another accuracy
    wrong = evcli.evaluate_model(model, b.x_test, 9 - b.y_test, [str(j) for j in range(10)])["accuracy"]
    assert wrong != pytest.approx(want)
    # '' keeps a set's own names (here the default '0'..'9')
    argv = ["--model", str(t / "unified"), "--data", f"b={tmp_path / 'b.npz'}", "--class-names", "",
            "--data", f"rev={tmp_path / 'b_rev.npz'}", "--class-names", reverse, "--json", str(out)]
    assert evcli.main_evaluate(argv) == 0
    res = json.loads(out.read_text())
    assert res["b"]["accuracy"] == pytest.approx(want) and res["rev"]["accuracy"] == pytest.approx(want)


def test_class_names_count_must_match_the_data_sets(work, capsys):  # noqa: F811
    t, _ = work
    argv = ["--model", str(t / "unified"), "--data", str(t / "a_test.npz"), "--data", str(t / "a_test.npz"),
            "--class-names", ",".join(str(j) for j in range(10))]
    rc = evcli.main_evaluate(argv)
    out = capsys.readouterr()
    assert rc == 2 and "one --class-names per --data" in out.err and "got 1 --class-names for 2 --data" in out.err
    assert "accuracy" not in out.out


def test_folder_without_a_finished_result(tmp_path, capsys):
    (tmp_path / "u" / "checkpoints").mkdir(parents=True)
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8), np.float32), y=np.zeros(2, np.int64))
    rc = evcli.main_evaluate(["--model", str(tmp_path / "u"), "--data", str(tmp_path / "d.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "no finished unified model" in err, err
    rc = evcli.main_evaluate(["--model", str(tmp_path / "nothing"), "--data", str(tmp_path / "d.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "not a unified model folder" in err, err
