"""``longinfer models list | fetch NAME | path NAME``: the offline model zoo from the shell.

``path`` prints the local GGUF file of a fetched model (nothing else on stdout), so scripts can
use ``$(longinfer models path NAME)``, e.g. to carry the file to a GPU machine.
"""

from __future__ import annotations

import argparse
import sys

from longinfer.models import zoo
from longinfer.models.download import FetchError, cache_root


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command and its three actions to the top-level CLI."""
    parser = subparsers.add_parser("models", help="list, fetch and locate the offline model zoo")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        default=None,
        help="cache root (default: $LONGINFER_CACHE or ~/.cache/longinfer)",
    )
    actions = parser.add_subparsers(dest="models_action", required=True, metavar="ACTION")
    list_parser = actions.add_parser(
        "list", parents=[common], help="show the zoo and which models are fetched"
    )
    list_parser.set_defaults(func=_list)
    for action, handler, help_text in (
        ("fetch", _fetch, "download, verify and cache a model; prints its GGUF path"),
        ("path", _path, "print the local GGUF path of a fetched model (never downloads)"),
    ):
        action_parser = actions.add_parser(action, parents=[common], help=help_text)
        action_parser.add_argument("name", help="zoo name, see `longinfer models list`")
        action_parser.set_defaults(func=handler)


def _list(args: argparse.Namespace) -> int:
    header = ("name", "model", "arch", "layers", "heads q/kv", "D", "context", "MiB", "fetched")
    rows = [header]
    for model in zoo.MODELS.values():
        path = zoo.local_path(model.name, args.cache_dir)
        context = f"{model.context_length // 1024}K"
        if model.yarn_context:
            context += f" ({model.yarn_context // 1024}K YaRN)"
        default = " (default)" if model.name == zoo.DEFAULT_MODEL else ""
        rows.append(
            (
                model.name + default,
                model.description,
                model.architecture,
                str(model.num_layers),
                f"{model.num_q_heads}/{model.num_kv_heads}",
                str(model.head_dim),
                context,
                f"{model.file.size / 2**20:.0f}",
                "yes" if path is not None else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"cache: {cache_root(args.cache_dir)}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    try:
        path = zoo.fetch(args.name, args.cache_dir)
    except (zoo.UnknownModelError, FetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _path(args: argparse.Namespace) -> int:
    try:
        path = zoo.local_path(args.name, args.cache_dir)
    except zoo.UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if path is None:
        print(
            f"error: {args.name} is not fetched into {cache_root(args.cache_dir)}; run "
            f"`longinfer models fetch {args.name}` first",
            file=sys.stderr,
        )
        return 1
    print(path)
    return 0
