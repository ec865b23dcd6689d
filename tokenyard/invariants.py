"""The integrity checks' own exception. Pure Python: ``sched/`` and ``kv/`` raise it.

The checks raise this instead of using ``assert``, which ``python -O`` strips: a production server that runs
``check_invariants()`` when idle must still see a leaked or double-owned block.
"""

from __future__ import annotations


class InvariantError(RuntimeError):
    """The scheduler's or the KV bookkeeping's state contradicts itself (a bug, never bad input)."""


def require(condition: object, message: str) -> None:
    """Raise :class:`InvariantError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InvariantError(message)
