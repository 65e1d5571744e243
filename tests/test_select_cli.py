"""`metamoe select`: the client-side stage from .npy files, in subprocesses, checked against the library."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from metamoe.cli import main as metamoe_main
from metamoe.selection import relevance_scores, select_dpp, select_random, select_top_relevance
from metamoe.selection.methods import (
    METHOD_ALIASES,
    SELECT_COMMAND_METHODS,
    SELECTION_METHODS,
    canonical_method,
)

N, M, D, K = 300, 60, 8, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(2024)
    path = tmp_path_factory.mktemp("select")
    P = (rng.standard_normal((M, D)) + 1.5).astype(np.float32)
    X = rng.standard_normal((N, D)).astype(np.float32)
    X[:40] += 1.5  # part of the pool looks like the private domain
    X = X.astype(np.float16)  # the pool stored in float16, read through a memmap
    np.save(path / "p.npy", P)
    np.save(path / "x.npy", X)
    return path, P, X


def _cmd(path, *args):
    return [
        sys.executable,
        "-m",
        "metamoe",
        "select",
        "--private",
        str(path / "p.npy"),
        "--public",
        str(path / "x.npy"),
        "--no-progress",
        *args,
    ]


# --method: every canonical name and every short spelling (the JSON records the canonical name)
SPELLINGS = list(SELECT_COMMAND_METHODS) + list(METHOD_ALIASES)


@pytest.fixture(scope="module")
def runs(data):
    """Every method through `python -m metamoe select`; the subprocesses start together (start-up)."""
    path, _, _ = data
    procs = {}
    for method in SPELLINGS:
        extra = ["--ridge", "0.01", "--candidates", "100"] if method == "dpp" else []
        out = path / f"sel_{method}.json"
        procs[method] = (
            subprocess.Popen(
                _cmd(path, "--k", str(K), "--method", method, "--out", str(out), *extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            ),
            out,
        )
    results = {}
    for method, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        results[method] = (proc.returncode, stdout, stderr, out)
    return results


@pytest.fixture(scope="module")
def relevance(data):
    _, P, X = data
    return relevance_scores(P, X, seed=0, progress=False)


def _check_json(out, method, k=K):
    d = json.loads(out.read_text())
    for key in ("indices", "gains", "objective", "method", "backend", "seconds"):
        assert key in d, key
    assert d["method"] == method
    assert len(d["indices"]) == len(d["gains"]) == k
    assert len(set(d["indices"])) == k and all(0 <= i < N for i in d["indices"])
    assert d["seconds"] >= 0 and d["info"]["total_seconds"] >= d["seconds"]
    return d


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_method_in_a_subprocess(spelling, data, runs, relevance):
    path, P, X = data
    rc, stdout, stderr, out = runs[spelling]
    assert rc == 0, stderr
    assert "objective" in stdout and " s" in stdout
    method = canonical_method(spelling, "--method", SELECT_COMMAND_METHODS)
    assert f"by {method}," in stdout
    d = _check_json(out, method)
    # the same stage through the library gives the same picks (relevance is deterministic on the CPU)
    rel = relevance if method in ("dpp", "top_relevance", "facility_location") else None
    if method == "dpp":
        ref = select_dpp(X, K, rel, ridge=0.01, candidates=100, progress=False)
        assert d["info"]["candidates"] == 100
    elif method == "top_relevance":
        ref = select_top_relevance(rel, K)
        assert d["indices"][0] < 40  # the most relevant sample comes from the private-like part
    elif method == "random":
        ref = select_random(N, K, seed=0)
        assert d["objective"] == 0
    else:
        from metamoe.selection import select_facility_location

        ground = P if method == "facility_location_private" else None
        ref = select_facility_location(X, K, ground=ground, weights=rel, n_neighbors=20, progress=False)
    assert d["indices"] == ref.indices.tolist()
    assert d["objective"] == pytest.approx(ref.objective, rel=1e-9, abs=1e-12)


def test_dpp_rbf_and_seed_options(data, capsys):
    path, P, X = data
    out = path / "rbf.json"
    rc = metamoe_main(
        [
            "select",
            "--private",
            str(path / "p.npy"),
            "--public",
            str(path / "x.npy"),
            "--k",
            "20",
            "--kernel",
            "rbf",
            "--gamma",
            "2.0",
            "--seed",
            "3",
            "--backend",
            "torch",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    d = _check_json(out, "dpp", k=20)
    assert d["backend"] == "torch" and d["info"]["gamma"] == 2.0 and d["info"]["seed"] == 3
    ref = select_dpp(
        X, 20, relevance_scores(P, X, seed=3, progress=False), kernel="rbf", gamma=2.0, progress=False
    )
    assert d["indices"] == ref.indices.tolist()


def test_rank_warning_is_printed(data, capsys):
    path, _, _ = data
    rc = metamoe_main(
        [
            "select",
            "--private",
            str(path / "p.npy"),
            "--public",
            str(path / "x.npy"),
            "--k",
            "12",
            "--ridge",
            "0",
            "--no-progress",
            "--out",
            str(path / "w.json"),
        ]
    )
    assert rc == 0
    cap = capsys.readouterr()
    assert "warning: select_dpp stopped after 8 of 12 picks" in cap.err  # rank D = 8 with ridge 0
    assert len(json.loads((path / "w.json").read_text())["indices"]) == 8


@pytest.mark.parametrize(
    "args,match",
    [
        (["--k", "301"], r"k=301 is larger than the pool \(N=300\)"),
        (["--k", "0"], "k must be >= 1"),
        (["--k", "5", "--candidates", "3"], "candidates must satisfy k=5 <= candidates"),
        (["--k", "5", "--method", "topk", "--ridge", "0.1"], "--ridge only apply to --method dpp"),
        (["--k", "5", "--backend", "fast"], "backend must be one of"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, match, data, capsys):
    path, _, _ = data
    rc = metamoe_main(
        [
            "select",
            "--private",
            str(path / "p.npy"),
            "--public",
            str(path / "x.npy"),
            "--no-progress",
            "--out",
            str(path / "bad.json"),
            *args,
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "metamoe select: error:" in err
    import re

    assert re.search(match, err), err
    assert not (path / "bad.json").exists()


def test_bad_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "p.npy", rng.standard_normal((10, 4)).astype(np.float32))
    np.save(tmp_path / "x5.npy", rng.standard_normal((30, 5)).astype(np.float32))
    np.save(tmp_path / "xi.npy", np.ones((30, 4), np.int64))
    base = [
        "select",
        "--private",
        str(tmp_path / "p.npy"),
        "--k",
        "3",
        "--no-progress",
        "--out",
        str(tmp_path / "o.json"),
    ]
    assert metamoe_main(base + ["--public", str(tmp_path / "missing.npy")]) == 2
    assert "--public: no such file" in capsys.readouterr().err
    assert metamoe_main(base + ["--public", str(tmp_path / "x5.npy")]) == 2
    assert "same embedding dimension D" in capsys.readouterr().err
    assert metamoe_main(base + ["--public", str(tmp_path / "xi.npy")]) == 2
    assert "public must have a floating dtype" in capsys.readouterr().err
    whole = (tmp_path / "x5.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    assert metamoe_main(base + ["--public", str(tmp_path / "cut.npy")]) == 2
    err = capsys.readouterr().err
    assert f"--public {tmp_path / 'cut.npy'} is truncated or corrupt" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "afile").write_text("")
    out = base.index("--out") + 1
    for bad, why in ((tmp_path / "afile" / "o.json", f"{tmp_path / 'afile'} is a file, not a folder"),
                     (tmp_path, f"--out {tmp_path} is a folder, not a file")):
        argv = [*base[:out], str(bad), *base[out + 1:], "--public", str(tmp_path / "x5.npy")]
        assert metamoe_main(argv) == 2  # before the D mismatch is found: the output is checked first
        assert why in capsys.readouterr().err
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert metamoe_main(base[:2] + [str(tmp_path / "obj.npy")] + base[3:] + ["--public", str(tmp_path / "x5.npy")]) == 2
    assert f"--private {tmp_path / 'obj.npy'} holds Python objects" in capsys.readouterr().err


def test_method_vocabulary():
    assert SELECTION_METHODS == ("dpp", "facility_location", "top_relevance", "random")
    assert SELECT_COMMAND_METHODS == SELECTION_METHODS + ("facility_location_private",)
    for name in SELECT_COMMAND_METHODS:
        assert canonical_method(name, "--method", SELECT_COMMAND_METHODS) == name
    assert canonical_method("fl", "m") == "facility_location"
    assert canonical_method("topk", "m") == "top_relevance"
    assert canonical_method("fl-private", "--method", SELECT_COMMAND_METHODS) == "facility_location_private"
    with pytest.raises(ValueError, match=r"selection.method must be one of dpp, facility_location, top_relevance, "
                                         r"random \(short spellings: fl = facility_location, topk = top_relevance\), "
                                         r"got 'fl-private'"):
        canonical_method("fl-private", "selection.method")  # not one of a package's methods
    for bad in ("greedy", "", None, 3, "TOPK"):
        with pytest.raises(ValueError, match="must be one of"):
            canonical_method(bad, "m", SELECT_COMMAND_METHODS)


def test_unknown_method_is_refused_with_the_list(data, capsys):
    path, _, _ = data
    with pytest.raises(SystemExit) as exc:
        metamoe_main(["select", "--private", str(path / "p.npy"), "--public", str(path / "x.npy"), "--k", "3",
                      "--method", "greedy", "--out", str(path / "never.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--method must be one of dpp, facility_location, top_relevance, random, facility_location_private" in err
    assert "fl-private = facility_location_private" in err and "got 'greedy'" in err
    assert not (path / "never.json").exists()


def test_dpp_default_ridge_keeps_k_above_d_and_zero_ridge_stops_at_rank(data, tmp_path, capsys):
    """The cosine kernel has rank <= D = 8: the command's default ridge (1e-3) makes it full rank, so k = 20
    picks are all made; --ridge 0 stops at D picks, says so, and the JSON records what was asked."""
    path, _, _ = data
    base = ["select", "--private", str(path / "p.npy"), "--public", str(path / "x.npy"), "--no-progress",
            "--method", "dpp", "--k", "20", "--backend", "cpp"]
    assert metamoe_main([*base, "--out", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert len(a["indices"]) == 20 and a["info"]["ridge"] == 1e-3 and a["info"]["strategy"].startswith("lazy")
    assert metamoe_main([*base, "--ridge", "0", "--strategy", "sweep", "--out", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert len(b["indices"]) == 8 and b["info"]["k_requested"] == 20 and b["info"]["strategy"] == "sweep"
    assert "stopped after 8 of 20 picks" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        metamoe_main(["select", "--private", "p", "--public", "x", "--k", "2", "--strategy", "fast", "--out", "o"])
    assert exc.value.code == 2
