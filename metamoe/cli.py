"""The ``metamoe`` command line (also ``python -m metamoe``): one program, one subcommand per job.

    metamoe [--traceback] <command> [options]

Exit codes (the same for every command, so that a script can rely on them):

* 0: success.
* 1: an unexpected error, that is a bug: Python's traceback is printed.
* 2: bad arguments, configuration or input data, reported by the command in one line (argparse's usage
  errors included; select, embed-pool, train-expert, unify and evaluate report a named input file that does
  not exist this way), and an output the command's preflight finds it cannot write (not writable, a folder
  where a file goes, too little free disk, an existing result not to be replaced): refused before any work.
* 74 (``EX_IOERR``): an operating-system error that the command does not report itself, met during the work:
  permission denied, disk full, a folder where a file is expected, ... One line
  ``metamoe <command>: error: <reason>: <file>`` (``<file> -> <other file>`` for a rename or copy).
* 130 (128 + SIGINT): interrupted by Ctrl-C; one line ``metamoe <command>: interrupted``.
* 141 (128 + SIGPIPE): standard output was closed early (``metamoe info | head -1``); nothing is printed.
* 143 (128 + SIGTERM): terminated by SIGTERM (``kill``, a scheduler, torchrun stopping its workers); one line
  ``metamoe <command>: terminated``. While a command runs in the main thread, SIGTERM raises
  :class:`Terminated` (a :class:`KeyboardInterrupt`, so the clean-up that a Ctrl-C runs runs too); a second
  SIGTERM during that clean-up ends the process at once.

``--traceback`` (before the command) or the environment variable ``METAMOE_TRACEBACK=1`` also prints the full
traceback of an error, an interrupt or a termination; the exit code stays the same.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import Callable, Dict, List, Optional

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_IOERR = 74
EXIT_INTERRUPTED = 128 + int(signal.SIGINT)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE (13 on Linux and macOS; Windows has no SIGPIPE)
EXIT_TERMINATED = 128 + int(signal.SIGTERM)

TRACEBACK_ENV = "METAMOE_TRACEBACK"

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK:<3}  success
  {EXIT_BUG:<3}  unexpected error (a bug; Python's traceback is printed)
  {EXIT_USAGE:<3}  bad arguments, configuration or input data, or an output the preflight finds unwritable
       (one line, before any work)
  {EXIT_IOERR:<3}  I/O or operating-system error during the work: permission denied, disk full, ... (one line
       naming the file)
  {EXIT_INTERRUPTED:<3}  interrupted (Ctrl-C)
  {EXIT_BROKEN_PIPE:<3}  standard output closed early (e.g. piped into head)
  {EXIT_TERMINATED:<3}  terminated (SIGTERM)

options before the command:
  --traceback  also print the full traceback of an error or interrupt (or set {TRACEBACK_ENV}=1)"""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM while a command runs, so that it unwinds like a Ctrl-C."""


def _cmd_info(argv: List[str]) -> int:
    from . import info

    return info.main(argv)


def _cmd_demo(argv: List[str]) -> int:
    from . import demo

    return demo.main(argv)


def _cmd_select(argv: List[str]) -> int:
    from .selection import cli as selection_cli

    return selection_cli.main(argv)


def _cmd_bench(argv: List[str]) -> int:
    from . import bench

    return bench.main(argv)


def _cmd_train_expert(argv: List[str]) -> int:
    from .unify import train_expert_cli

    return train_expert_cli.main_train_expert(argv)


def _cmd_embed_pool(argv: List[str]) -> int:
    from .unify import pool_embedding_cli

    return pool_embedding_cli.main(argv)


def _cmd_unify(argv: List[str]) -> int:
    from .unify import cli as unify_cli

    return unify_cli.main_unify(argv)


def _cmd_evaluate(argv: List[str]) -> int:
    from .unify import evaluate_cli

    return evaluate_cli.main_evaluate(argv)


COMMANDS: Dict[str, tuple] = {
    "info": (_cmd_info, "show versions, the compiled extension and every op's backends"),
    "demo": (_cmd_demo, "run the end-to-end example on the bundled digits data"),
    "select": (
        _cmd_select,
        "client-side proxy selection: relevance, then dpp / facility_location[_private] / top_relevance / random",
    ),
    "embed-pool": (
        _cmd_embed_pool,
        "embed a public pool with the seed model into memmap shards (torchrun: one per rank)",
    ),
    "train-expert": (
        _cmd_train_expert,
        "client side: select proxies, train a proxy-aligned LoRA expert, write a package",
    ),
    "unify": (_cmd_unify, "server side: validate packages, build the MoE, train the routers on the proxies"),
    "evaluate": (_cmd_evaluate, "accuracy (or next-token loss) of a unified model on labelled data"),
    "bench": (_cmd_bench, "run the benchmark scripts of a source checkout (metamoe bench --list)"),
}


def _oserror_line(exc: OSError) -> str:
    """One line for an OSError: its reason and the file(s) it names."""
    if exc.strerror:
        msg = exc.strerror
        if exc.filename is not None:
            msg += f": {os.fsdecode(exc.filename)}"
        if exc.filename2 is not None:
            msg += f" -> {os.fsdecode(exc.filename2)}"
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.splitlines())


def _traceback_wanted(argv: List[str]) -> bool:
    """Remove the leading ``--traceback`` options from argv; True when one was given or METAMOE_TRACEBACK is set."""
    wanted = os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    while argv and argv[0] == "--traceback":
        argv.pop(0)
        wanted = True
    return wanted


def _install_sigterm_handler():
    """Make SIGTERM raise :class:`Terminated` (main thread only); returns the handler to restore, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up ends the process
        raise Terminated()

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except (ValueError, OSError):  # no signals here (e.g. an embedded interpreter)
        return None
    return signal.SIG_DFL if previous is None else previous


def _stdout_to_devnull() -> None:
    """Point the standard output at /dev/null, so that flushing it at exit raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _run_command(name: str, fn: Callable[[List[str]], int], rest: List[str], show_traceback: bool) -> int:
    """Run one command; an interrupt, SIGTERM or OSError ends it with one line and a documented exit code."""
    prog = f"metamoe {name}"
    previous = _install_sigterm_handler()
    try:
        try:
            rc = int(fn(rest) or 0)
        except SystemExit:  # argparse's --help and usage errors
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # a closed standard output fails here, not after main has returned
        return rc
    except Terminated:
        if show_traceback:
            traceback.print_exc()
        print(f"{prog}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        if show_traceback:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            _stdout_to_devnull()
            return EXIT_BROKEN_PIPE
        if show_traceback:
            traceback.print_exc()
        print(f"{prog}: error: {_oserror_line(exc)}", file=sys.stderr)
        return EXIT_IOERR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[List[str]] = None) -> int:
    """``metamoe <command> [options]``: run ``command``; the exit codes are in the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = _traceback_wanted(argv)
    width = max(len(c) for c in COMMANDS)
    usage = "metamoe [--traceback] <command> [options]\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {helptext}" for name, (_, helptext) in COMMANDS.items()
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {usage}\n\n{EXIT_CODES_HELP}\n\nRun `metamoe <command> --help` for a command's options.")
        return EXIT_OK
    if argv[0] == "--version":
        from .version import __version__

        print(__version__)
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"metamoe: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    fn: Callable[[List[str]], int] = COMMANDS[name][0]
    return _run_command(name, fn, rest, show_traceback)


if __name__ == "__main__":
    sys.exit(main())
