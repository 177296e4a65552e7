"""Plan variants for GPU sessions: a committed plan with every head changed, written with its provenance.

Each ``docs/results/gpu-sessionNN/plans/make_plans.py`` writes the plans its session's runs compare
(``q15-NAME-tail.json``) from an earlier plan file through :func:`write_variant`, so the files are
reproducible from the repository by rerunning the script from the repository root.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

Head = dict[str, Any]


def write_variant(source: str, out_dir: str, name: str, head_of: Callable[[Head], Head], note: str) -> None:
    """Write ``out_dir/q15-NAME-tail.json``: the plan ``source`` with every head replaced by ``head_of(head)``.

    The plan's search note becomes ``note`` plus the command that wrote it and ``source``; the file is
    indented JSON (one space), and ``name`` is printed.
    """
    with open(source) as file:
        plan = json.load(file)
    for layer in plan["layers"]:
        layer["heads"] = [head_of(head) for head in layer["heads"]]
    plan["search"]["note"] = f"{note}; written by `{' '.join(sys.argv)}` from {source}"
    with open(f"{out_dir}/q15-{name}-tail.json", "w") as file:
        json.dump(plan, file, indent=1)
    print(name)


def with_params(**changes: Any) -> Callable[[Head], Head]:
    """A ``head_of`` for :func:`write_variant`: the head with ``changes`` applied to its parameters (keys
    already there keep their place, new ones follow in the order given)."""
    return lambda head: {**head, "params": {**head["params"], **changes}}
