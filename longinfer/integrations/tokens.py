"""The token ids a patched model's attention calls see, for estimates that read the text itself.

An attention function gets ``q``, ``k`` and ``v``, not the tokens. Plans whose vertical-slash heads
use ``repeat_rows`` (extra estimation rows where a token n-gram repeats at a distance, see
:mod:`longinfer.patterns.repeat_rows`) need the ids of the whole sequence. :func:`patch` then hooks
the model's forward (:func:`install`): before each forward :class:`TokenHistory` records the new
``input_ids``, appended to the ids of the cached prefix, and the layers' sparse calls ask it for
their estimation rows, built once per forward and shape and shared by every layer (one n-gram sort
over the sequence per forward, on the GPU, no host synchronization).

When the history does not know the ids (``inputs_embeds`` instead of ids, a cache filled by
another forward, a model loaded with ``attn_implementation="longinfer"`` and never patched) the
unknown positions never count as repeats: the extra rows are spread rows, and that is logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from longinfer.patterns.vertical_slash import VerticalSlashConfig, call_estimation_positions
from longinfer.plans.schema import Plan

logger = logging.getLogger(__name__)

UNKNOWN_TOKEN = -1  # the id recorded for a position whose token the history never saw

_unknown_ids_logged: list[bool] = []  # logged once per process, not once per (possibly throwaway) history

# (batch row, first key, end key) of one padded sequence's span, or None for the whole batch.
Span = tuple[int, int, int] | None


@dataclass
class TokenHistory:
    """Token ids ``[B, N]`` of the sequence a patched model is processing (shared by its layers).

    :meth:`observe` runs before each forward; :meth:`estimation_rows` serves the layers.
    """

    ids: torch.Tensor | None = None
    _rows: dict[tuple[Any, ...], torch.Tensor | None] = field(default_factory=dict, repr=False)

    def observe(self, input_ids: torch.Tensor | None, past_len: int) -> None:
        """Record a forward's ``input_ids [B, n]`` after ``past_len`` cached positions.

        The new ids extend the history when it holds exactly ``past_len`` positions of the same
        batch size; otherwise the prefix is unknown (:data:`UNKNOWN_TOKEN`). ``None`` (embeddings
        passed instead of ids) forgets the history.
        """
        self._rows.clear()
        if input_ids is None or input_ids.dim() != 2:
            self.ids = None
            return
        known = self.ids is not None and self.ids.shape == (input_ids.shape[0], past_len)
        if past_len == 0:
            self.ids = input_ids
        elif known:
            self.ids = torch.cat([self.ids, input_ids.to(self.ids.device)], dim=1)
        else:
            prefix = torch.full((input_ids.shape[0], past_len), UNKNOWN_TOKEN, dtype=input_ids.dtype,
                                device=input_ids.device)
            self.ids = torch.cat([prefix, input_ids], dim=1)

    def estimation_rows(self, config: VerticalSlashConfig, q_len: int, k_len: int, device: torch.device,
                        span: Span = None) -> torch.Tensor | None:
        """The estimation positions of a call (:func:`call_estimation_positions` on the recorded ids),
        cached for the forward; ``span`` picks one padded sequence's keys."""
        key = (config, q_len, k_len, device, span)
        if key not in self._rows:
            self._rows[key] = call_estimation_positions(config, q_len, k_len, device, self._ids_for(k_len, span))
        return self._rows[key]

    def _ids_for(self, k_len: int, span: Span) -> torch.Tensor | None:
        ids = self.ids
        if ids is not None and span is not None:
            row, start, stop = span
            ids = ids[row: row + 1, start:stop] if row < ids.shape[0] and stop <= ids.shape[1] else None
        if ids is None or ids.shape[1] != k_len:
            if not _unknown_ids_logged:
                _unknown_ids_logged.append(True)
                logger.warning("repeat_rows: the token ids of this call are unknown (embeddings passed instead of ids, "
                               "or a cache this model's history did not see); its extra estimation rows are spread "
                               "rows, not repeats")
            return None
        return ids


def plan_uses_token_ids(plan: Plan) -> bool:
    """Whether any head of ``plan`` estimates with ``repeat_rows`` (and so needs the token ids)."""
    return any(isinstance(head.config, VerticalSlashConfig) and head.config.repeat_rows > 0
               for layer in plan.layers for head in layer.heads)


def _past_length(kwargs: dict[str, Any]) -> int:
    """Positions already cached before this forward (transformers names the cache ``past_key_values``,
    or ``cache`` in newer versions)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def install(model: Any, history: TokenHistory) -> Any:
    """Hook ``model``'s forward so that ``history`` sees each forward's ids; returns the hook's handle
    (``handle.remove()`` undoes it)."""

    def observe(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        history.observe(input_ids if isinstance(input_ids, torch.Tensor) else None, _past_length(kwargs))

    return model.register_forward_pre_hook(observe, with_kwargs=True)
