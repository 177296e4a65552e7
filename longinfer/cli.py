"""Command line: ``longinfer <command> ...``.

The CLI only parses arguments and calls the library. Each command lives in its own module that
exposes ``register(subparsers)``; that function adds the sub-parser and sets ``func`` on it, a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command name -> module exposing register(subparsers). Modules are imported lazily so a
# command that needs transformers does not slow down or break one that does not.
COMMAND_MODULES: dict[str, str] = {
    "models": "longinfer.models.cli",
    "demo": "longinfer.demo",
    "run": "longinfer.integrations.cli",
    "search": "longinfer.plans.cli",
    "info": "longinfer.plans.cli_info",
    "eval": "longinfer.eval.cli",
    "warmup": "longinfer.warmup",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longinfer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in COMMAND_MODULES.items():
        if wanted is not None and wanted in COMMAND_MODULES and name != wanted:
            sub.add_parser(name, help=f"see `longinfer {name} --help`")
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("longinfer"):
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
