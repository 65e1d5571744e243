"""Build script: setuptools drives CMakeLists.txt to build the pybind11 extension.

Two modules come out of the CMake build:

* ``metamoe._C``      C++17 (+ OpenMP where the compiler has it), always built.
* ``metamoe._C_cuda`` CUDA (sm_80, sm_90 machine code + compute_90 PTX), built where nvcc is found.

Neither links libtorch: they take NumPy buffers and raw device pointers, so one build works with
whatever torch is installed. Environment switches:

* ``METAMOE_CUDA=0``  skip the CUDA module;  ``METAMOE_CUDA=1`` require it (fails without nvcc);
  unset: build it where nvcc is found.
* ``METAMOE_NATIVE=1`` adds ``-march=native`` (off by default: wheels must be portable).
* ``MAX_JOBS=N`` caps parallel compile jobs (default: cores, capped by free memory).
* ``METAMOE_BUILD_DIR`` puts the CMake build tree somewhere else (default ``build/cmake``).
* ``METAMOE_CMAKE_BUILD_TYPE`` (default ``Release``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    ns: dict = {}
    exec((ROOT / "metamoe" / "version.py").read_text(), ns)
    return ns["__version__"]


def _free_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _parallel_jobs() -> int:
    """Compile jobs: MAX_JOBS if set, else cores capped so that each job has ~1.5 GiB (nvcc is hungry)."""
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    jobs = os.cpu_count() or 1
    free = _free_memory_bytes()
    if free is not None:
        jobs = min(jobs, max(1, int(free // (1.5 * 2**30))))
    return max(1, jobs)


def _cuda_switch() -> str:
    raw = os.environ.get("METAMOE_CUDA", "").strip().lower()
    if raw in ("", "auto"):
        return "AUTO"
    if raw in ("1", "on", "true", "yes"):
        return "ON"
    if raw in ("0", "off", "false", "no"):
        return "OFF"
    raise SystemExit(f"METAMOE_CUDA must be 0, 1 or unset (auto); got {raw!r}")


def _replace_file(src: Path, dest: Path) -> None:
    """Copy then rename: a process that has the old module loaded keeps its (unchanged) inode."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


class CMakeExtension(Extension):
    def __init__(self, name: str, optional: bool = False):
        super().__init__(name, sources=[])
        self.optional = optional


class CMakeBuild(build_ext):
    """Configure and build once with CMake, then copy each module to where setuptools expects it."""

    def run(self):
        if shutil.which("cmake") is None:
            raise SystemExit(
                "metamoe needs CMake >= 3.18 to build its extension (pip install cmake, or apt-get install cmake)"
            )
        build_dir = Path(os.environ.get("METAMOE_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        cuda = _cuda_switch()
        cfg = os.environ.get("METAMOE_CMAKE_BUILD_TYPE", "Release")
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMETAMOE_CUDA={cuda}",
            f"-DMETAMOE_NATIVE={'ON' if os.environ.get('METAMOE_NATIVE') == '1' else 'OFF'}",
            f"-DMETAMOE_VERSION={_version()}",
        ]
        if cuda == "ON" and shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
            for cand in ("/usr/local/cuda/bin/nvcc",):
                if Path(cand).exists():
                    break
            else:
                raise SystemExit(
                    "METAMOE_CUDA=1 asks for the CUDA module, but no nvcc was found on PATH, in CUDACXX "
                    "or at /usr/local/cuda/bin/nvcc. Install the CUDA toolkit or set METAMOE_CUDA=0."
                )
        subprocess.run(args, check=True)
        jobs = _parallel_jobs()
        print(f"metamoe: building with {jobs} parallel job(s)", flush=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--config", cfg, "--parallel", str(jobs)], check=True)

        info = build_dir / "build_info.json"
        for ext in self.extensions:
            stem = ext.name.split(".")[-1]
            built = sorted(build_dir.glob(f"{stem}.*.so")) + sorted(build_dir.glob(f"{stem}.*.pyd"))
            dest = Path(self.get_ext_fullpath(ext.name))
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not built:
                if ext.optional:
                    if dest.exists():  # a stale module from an earlier build must not survive
                        dest.unlink()
                    print(f"metamoe: {ext.name} was not built (see build_info.json for why)", flush=True)
                    continue
                raise SystemExit(f"CMake finished but produced no {stem} module in {build_dir}")
            _replace_file(built[0], dest)
        if info.exists():
            pkg_dir = Path(self.get_ext_fullpath("metamoe._C")).parent
            _replace_file(info, pkg_dir / "_build_info.json")


setup(
    name="metamoe",
    version=_version(),
    description="Privacy-preserving MoE unification: million-scale proxy selection, fast MoE kernels, MetaMoE",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["metamoe", "metamoe.*"])
    + ["metamoe.kernels"]
    + [f"metamoe.kernels.{p}" for p in find_packages(where="kernels")],
    package_dir={"metamoe": "metamoe", "metamoe.kernels": "kernels"},
    package_data={"metamoe": ["_build_info.json"]},
    ext_modules=[CMakeExtension("metamoe._C"), CMakeExtension("metamoe._C_cuda", optional=True)],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "numpy>=1.23",
        "torch>=2.3",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "faiss-cpu>=1.7.4",
        "pyyaml>=6",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "models": ["timm>=1.0", "transformers>=4.45", "scikit-learn>=1.2", "matplotlib>=3.6"],
        "bench": ["apricot-select>=0.6", "scipy>=1.9"],  # the peers the selection benchmarks compare with
        "test": [
            "triton>=3.0",
            "timm>=1.0",
            "torchvision",
            "transformers>=4.45",
            "scikit-learn>=1.2",
            "matplotlib>=3.6",
            "pytest>=7",
            "pytest-benchmark>=4",
            "ruff>=0.5",
            "pybind11>=2.10",  # for `make ext` (in-place rebuilds without build isolation)
            "setuptools>=64",
        ],
    },
    entry_points={"console_scripts": ["metamoe=metamoe.cli:main"]},
    zip_safe=False,
)
