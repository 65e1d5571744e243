"""`metamoe <command>` ends an I/O error, Ctrl-C, SIGTERM or a closed stdout with one line and a fixed exit code."""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

from metamoe import cli


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    env.update(extra)
    return env


def _run(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "metamoe", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=_env(**env),
    )


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool.npy"
    np.save(path, np.ones((8, 3), np.float32))
    return str(path)


def _select(private, public, out, *extra):
    return ("select", "--private", private, "--public", public, "--k", "2", "--method", "random", "--out", out,
            *extra)


# ----------------------------------------------------------------------------------------- I/O errors (74)


def test_unreadable_input_is_one_line_naming_the_file(tmp_path, pool):
    bad = tmp_path / "private.npy"
    bad.mkdir()  # a folder where a file is expected: fails for root too
    out = _run(*_select(str(bad), pool, str(tmp_path / "sel.json")))
    assert out.returncode == cli.EXIT_IOERR == 74
    assert _one_line(out.stderr) == f"metamoe select: error: Is a directory: {bad}"
    assert not (tmp_path / "sel.json").exists()


def test_unwritable_output_is_one_line_naming_the_file(tmp_path, pool):
    target = tmp_path / "sel.json"
    target.mkdir()  # a folder where the output file goes: the preflight refuses it before any work (exit 2)
    out = _run(*_select(pool, pool, str(target)))
    assert out.returncode == cli.EXIT_USAGE == 2
    assert _one_line(out.stderr) == f"metamoe select: error: --out {target} is a folder, not a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.npy", "sel.json"]  # nothing written


def test_an_output_failing_during_the_work_is_exit_74(tmp_path, pool, monkeypatch, capsys):
    """Past the preflight, an OS error while writing (here the rename onto a folder that appeared meanwhile) is
    one line naming both files, exit 74, and no temporary file is left."""
    import metamoe.selection.cli as select_cli

    target = tmp_path / "sel.json"
    real = select_cli.check_file_output
    monkeypatch.setattr(select_cli, "check_file_output", lambda p, what: (real(p, what), target.mkdir()))
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(list(_select(pool, pool, str(target), "--no-progress"))) == 74
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("metamoe select: error: Is a directory: ") and line.endswith(f" -> {target}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.npy", "sel.json"]  # no temporary file left


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder_is_permission_denied(tmp_path, pool):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = _run(*_select(pool, pool, str(ro / "sel.json")))
    finally:
        ro.chmod(0o755)
    assert out.returncode == 2  # the preflight finds it before any work
    line = _one_line(out.stderr)
    assert line == f"metamoe select: error: the folder of --out {ro} cannot be written: no write permission in {ro}"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_traceback_on_request_keeps_the_exit_code(tmp_path, pool, how):
    bad = tmp_path / "private.npy"
    bad.mkdir()
    args = _select(str(bad), pool, str(tmp_path / "sel.json"))
    out = _run("--traceback", *args) if how == "flag" else _run(*args, METAMOE_TRACEBACK="1")
    assert out.returncode == 74
    assert "Traceback (most recent call last)" in out.stderr and "IsADirectoryError" in out.stderr
    assert out.stderr.splitlines()[-1] == f"metamoe select: error: Is a directory: {bad}"


# ------------------------------------------------------------------------- argument / input errors stay 2


def test_missing_input_and_usage_errors_stay_exit_2(tmp_path, pool):
    missing = tmp_path / "nope.npy"
    out = _run(*_select(str(missing), pool, str(tmp_path / "sel.json")))
    assert out.returncode == 2
    line = _one_line(out.stderr)
    assert line.startswith("metamoe select: error: ") and str(missing) in line
    out = _run("select", "--k", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "required" in out.stderr


# ---------------------------------------------------------------------------------- Ctrl-C and SIGTERM


def _open_fifo_writer(path, proc, timeout=60.0):
    """Open the FIFO for writing once ``proc`` has it open for reading (so it is blocked inside the command)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        if proc.poll() is not None:
            pytest.fail(f"the command ended before reading its input: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail("the command never opened its input")
        time.sleep(0.02)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
@pytest.mark.parametrize(
    "sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signal_while_reading_is_one_line(tmp_path, pool, sig, code, word):
    fifo = tmp_path / "private.npy"
    os.mkfifo(fifo)  # reading it blocks until the test writes: the command is stopped mid-step
    proc = subprocess.Popen(
        [sys.executable, "-m", "metamoe", *_select(str(fifo), pool, str(tmp_path / "sel.json"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(),
    )
    fd = None
    try:
        fd = _open_fifo_writer(fifo, proc)
        proc.send_signal(sig)
        try:
            stdout, stderr = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # the kernel gave the signal to another thread (numpy's and torch's pools): Python has it pending,
            # but the main thread stays in read() until the pipe moves; closing the writer ends that read
            os.close(fd)
            fd = None
            stdout, stderr = proc.communicate(timeout=60)
    finally:
        if fd is not None:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, stderr
    assert _one_line(stderr) == f"metamoe select: {word}"
    assert not (tmp_path / "sel.json").exists()


def test_closed_stdout_exits_141_silently():
    proc = subprocess.Popen(
        [sys.executable, "-m", "metamoe", "bench", "--list"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=_env(),
    )
    proc.stdout.close()  # like `metamoe bench --list | head -0`
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == 141, stderr
    assert stderr == ""


# ------------------------------------------------------------------------------- in process: every mapping


def _fake(monkeypatch, fn):
    monkeypatch.setitem(cli.COMMANDS, "fake", (fn, "a test command"))
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)


@pytest.mark.parametrize(
    "exc, line",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out.bin"),
         f"{os.strerror(errno.ENOSPC)}: /data/out.bin"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/etc/x"), f"{os.strerror(errno.EACCES)}: /etc/x"),
        (OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b"), f"{os.strerror(errno.EXDEV)}: /a -> /b"),
        (OSError(errno.EIO, os.strerror(errno.EIO)), os.strerror(errno.EIO)),
        (FileNotFoundError("--x: no such file:\nfoo.npy"), "--x: no such file: foo.npy"),
    ],
)
def test_oserror_maps_to_74_and_one_line(monkeypatch, capsys, exc, line):
    def fn(argv):
        raise exc

    _fake(monkeypatch, fn)
    assert cli.main(["fake"]) == 74
    assert capsys.readouterr().err == f"metamoe fake: error: {line}\n"


def test_sigterm_in_process_exits_143_and_restores_the_handler(monkeypatch, capsys):
    def fn(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted by the handler
        return 0

    _fake(monkeypatch, fn)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["fake"]) == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert capsys.readouterr().err == "metamoe fake: terminated\n"


def test_keyboard_interrupt_in_process_exits_130(monkeypatch, capsys):
    def fn(argv):
        raise KeyboardInterrupt

    _fake(monkeypatch, fn)
    assert cli.main(["fake"]) == 130
    assert capsys.readouterr().err == "metamoe fake: interrupted\n"


def test_other_errors_are_not_swallowed(monkeypatch):
    def fn(argv):
        raise RuntimeError("a bug")

    _fake(monkeypatch, fn)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["fake"])


def test_help_documents_the_exit_codes(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for code in ("74", "130", "141", "143", "--traceback", cli.TRACEBACK_ENV):
        assert code in out


def test_a_full_disk_while_saving_tensors_is_exit_74_naming_the_file(monkeypatch, tmp_path, capsys):
    """safetensors reports a failed write as a SafetensorError; save_safetensors turns it into the OSError it
    stands for (errno and file), so the command ends in one line and exit 74, and the temporary file is gone."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from metamoe.utils.files import atomic_write, save_safetensors

    def full(tensors, filename, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at '
                              f'path "{filename}"')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "router.safetensors"

    def fn(argv):
        atomic_write(out, lambda tmp: save_safetensors({"w": torch.zeros(2)}, tmp))

    _fake(monkeypatch, fn)
    assert cli.main(["fake"]) == 74
    err = capsys.readouterr().err
    assert err == f"metamoe fake: error: {os.strerror(errno.ENOSPC)}: {out}\n"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(
        SafetensorError("Error while serializing: invalid tensor")))
    with pytest.raises(SafetensorError, match="invalid tensor"):  # not an I/O error: raised as it is
        save_safetensors({"w": torch.zeros(2)}, out)
