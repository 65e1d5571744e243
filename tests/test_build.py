"""The native build: CMake's CPU target always, the CUDA target a switch that fails loudly when asked for."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _configure(tmp_path, cuda, path=None):
    import pybind11

    env = dict(os.environ)
    env.pop("CUDACXX", None)
    if path is not None:
        env["PATH"] = path
    cmd = [
        "cmake", "-S", ROOT, "-B", str(tmp_path / "b"),
        f"-DMETAMOE_CUDA={cuda}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _path_without_nvcc():
    dirs = [
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not os.path.exists(os.path.join(d, "nvcc"))
    ]
    return os.pathsep.join(dirs)


def test_cuda_on_without_nvcc_fails_loudly(tmp_path):
    out = _configure(tmp_path, "ON", path=_path_without_nvcc())
    assert out.returncode != 0
    assert "METAMOE_CUDA=ON but no CUDA compiler (nvcc) was found" in out.stdout + out.stderr


def test_cuda_off_records_why(tmp_path):
    out = _configure(tmp_path, "OFF")
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "b" / "build_info.json").read_text())
    assert info["cuda_built"] is False
    assert info["cuda_not_built_reason"] == "METAMOE_CUDA=0 at build time"


def test_cuda_auto_without_nvcc_builds_cpu_only(tmp_path):
    out = _configure(tmp_path, "AUTO", path=_path_without_nvcc())
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "b" / "build_info.json").read_text())
    assert info["cuda_built"] is False
    assert "no CUDA compiler" in info["cuda_not_built_reason"]
    assert "-march=native" not in info["cxx_flags"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_module_was_built_here():
    # nvcc is on this machine (and CI's): the installed package must carry _C_cuda, sm_80 + sm_90 + PTX.
    from metamoe.backends import availability

    info = availability.build_info()
    assert info["cuda_built"] is True, info
    assert {"80-real", "90-real", "90-virtual"} <= set(info["cuda_archs"])
    import metamoe

    pkg = os.path.dirname(metamoe.__file__)
    assert any(f.startswith("_C_cuda") and f.endswith(".so") for f in os.listdir(pkg))
    mod, reason = availability.extension("_C_cuda")
    assert mod is not None, reason  # it imports even without a GPU (static CUDA runtime)


def test_setup_rejects_bad_cuda_switch():
    env = dict(os.environ, METAMOE_CUDA="maybe")
    out = subprocess.run(
        [sys.executable, "setup.py", "build_ext"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert out.returncode != 0
    assert "METAMOE_CUDA must be 0, 1 or unset" in out.stderr + out.stdout


def test_cuda_module_sets_its_device_or_says_why():
    from metamoe.backends import availability

    mod, reason = availability.extension("_C_cuda")
    if mod is None:
        pytest.skip(f"_C_cuda unavailable: {reason}")
    count, _ = mod.device_count()
    if count == 0:
        with pytest.raises(RuntimeError, match=r"metamoe._C_cuda.set_device\(0\): "):
            mod.set_device(0)
    else:
        mod.set_device(count - 1)
        with pytest.raises(RuntimeError, match=rf"set_device\({count}\)"):
            mod.set_device(count)
