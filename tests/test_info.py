"""`python -m metamoe.info` and `metamoe info`: every backend named with a status, exit 0."""

import json
import subprocess
import sys

from conftest import ROOT


def test_info_module_runs_and_names_backends():
    out = subprocess.run([sys.executable, "-m", "metamoe.info"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for b in ("torch", "triton", "cpp", "cuda"):
        assert any(line.strip().startswith(b) and ("available" in line) for line in text.splitlines()), (b, text)
    assert "dpp_greedy" in text
    for pkg in ("torch", "triton", "numpy", "faiss"):
        assert pkg in text


def test_info_json_and_cli_agree():
    out = subprocess.run(
        [sys.executable, "-m", "metamoe", "info", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info["backends"]) == {"torch", "triton", "cpp", "cuda"}
    assert info["backends"]["torch"]["available"] is True
    for b, st in info["backends"].items():
        assert isinstance(st["reason"], str) and st["reason"], b
    assert "dpp_greedy" in info["ops"]
    # no GPU on CI: cuda must be unavailable with a reason saying why
    import torch

    if not torch.cuda.is_available():
        assert info["backends"]["cuda"]["available"] is False
        reason = info["backends"]["cuda"]["reason"]
        assert "CUDA device" in reason or "NVIDIA driver" in reason or "not built" in reason, reason


def test_extension_build_metadata():
    from metamoe.backends import availability

    mod, reason = availability.extension("_C")
    assert mod is not None, reason
    info = availability.build_info()
    assert info["version"] == mod.__version__
    assert info["cxx_compiler"]
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda_built"], bool)
    if info["cuda_built"]:
        assert info["cuda_archs"] and info["cuda_version"]
