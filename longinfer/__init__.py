"""longinfer: fast long-context prefill with dynamic sparse attention.

The public API (imported on first use, so ``import longinfer`` stays light and never imports
transformers)::

    patch(model, plan=None)   run a transformers model's attention with longinfer and a plan
    unpatch(model)            restore the model's previous attention
    attention_stats(model)    density and call counts since patching / reset_stats(model)
    prompt_end()              context: the calls inside end a prompt (a chunked prefill's last chunk)
    register()                make attn_implementation="longinfer" known to transformers
    Plan, load_plan(path)     per-head plans (JSON); default_plan_for(config), uniform_plan(...)
    generate(model, tokenizer, prompt, max_new_tokens=..., chunk_size=...)  greedy + timings

Kernels live in :mod:`longinfer.ops`, patterns in :mod:`longinfer.patterns`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module defining it
_LAZY = {
    "patch": "longinfer.integrations.transformers",
    "unpatch": "longinfer.integrations.transformers",
    "register": "longinfer.integrations.transformers",
    "attention_stats": "longinfer.integrations.transformers",
    "reset_stats": "longinfer.integrations.transformers",
    "plan_of": "longinfer.integrations.transformers",
    "AttentionStats": "longinfer.integrations.transformers",
    "prompt_end": "longinfer.integrations.transformers",
    "Plan": "longinfer.plans.schema",
    "default_plan_for": "longinfer.plans.schema",
    "uniform_plan": "longinfer.plans.schema",
    "load_plan": "longinfer.api",
    "generate": "longinfer.api",
    "Generation": "longinfer.api",
}

__all__ = [  # noqa: RUF022  (grouped as in the docstring)
    "__version__",
    "patch",
    "unpatch",
    "register",
    "attention_stats",
    "reset_stats",
    "plan_of",
    "AttentionStats",
    "prompt_end",
    "Plan",
    "default_plan_for",
    "uniform_plan",
    "load_plan",
    "generate",
    "Generation",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'longinfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
