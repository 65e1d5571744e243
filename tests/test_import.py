"""`import metamoe` never needs Triton, a GPU or the compiled extension."""

from conftest import run_python

HIDE_TRITON = "import sys; sys.modules['triton'] = None\n"
HIDE_EXT = "import sys; sys.modules['metamoe._C'] = None; sys.modules['metamoe._C_cuda'] = None\n"


def test_import_with_triton_hidden():
    out = run_python(
        HIDE_TRITON
        + "import metamoe, metamoe.selection\n"
        "from metamoe.backends import availability\n"
        "r = availability.backend_unavailable_reason('triton')\n"
        "assert r and 'triton is not installed' in r, r\n"
        "from metamoe.info import collect\n"
        "info = collect()\n"
        "assert info['backends']['triton']['available'] is False\n"
        "print('ok')\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_import_with_extension_hidden_falls_back_to_torch():
    out = run_python(
        HIDE_EXT
        + "import numpy as np, warnings\n"
        "import metamoe\n"
        "from metamoe.selection import select_dpp\n"
        "from metamoe.backends import availability, BackendNotSupportedError\n"
        "r = availability.backend_unavailable_reason('cpp')\n"
        "assert r and 'metamoe._C' in r, r\n"
        "X = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)\n"
        "sel = select_dpp(X, 5, progress=False)\n"
        "assert sel.backend == 'torch', sel.backend\n"
        "try:\n"
        "    select_dpp(X, 5, backend='cpp', progress=False)\n"
        "except BackendNotSupportedError as e:\n"
        "    assert 'metamoe._C' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('explicit cpp without the extension did not raise')\n"
        "print('ok')\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_import_is_light():
    # importing the package itself does not import torch's heavy friends or triton
    out = run_python("import sys, metamoe\nprint('triton' in sys.modules, 'metamoe._C' in sys.modules)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
