"""The ``metamoe`` command line (also ``python -m metamoe``): one program, one subcommand per job."""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional


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
    from .unify import cli as unify_cli

    return unify_cli.main_train_expert(argv)


def _cmd_embed_pool(argv: List[str]) -> int:
    from .unify import pool_embedding_cli

    return pool_embedding_cli.main(argv)


def _cmd_unify(argv: List[str]) -> int:
    from .unify import cli as unify_cli

    return unify_cli.main_unify(argv)


def _cmd_evaluate(argv: List[str]) -> int:
    from .unify import cli as unify_cli

    return unify_cli.main_evaluate(argv)


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


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(len(c) for c in COMMANDS)
    usage = "metamoe <command> [options]\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {helptext}" for name, (_, helptext) in COMMANDS.items()
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {usage}\n\nRun `metamoe <command> --help` for a command's options.")
        return 0
    if argv[0] == "--version":
        from .version import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"metamoe: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    fn: Callable[[List[str]], int] = COMMANDS[name][0]
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
