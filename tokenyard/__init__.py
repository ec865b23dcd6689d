"""tokenyard: an LLM serving system that schedules requests at every level.

The public names load lazily, so ``import tokenyard.sched`` (pure Python, used by the simulator) does not
pull in torch through this package's ``__init__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "tokenyard.entrypoints.llm",
    "LLMEngine": "tokenyard.engine.llm_engine",
    "EngineConfig": "tokenyard.config",
    "RequestOutput": "tokenyard.outputs",
    "SamplingParams": "tokenyard.sampling_params",
    "InvalidParameterError": "tokenyard.sampling_params",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # noqa: SIM108 - for type checkers and IDEs only
    from tokenyard.config import EngineConfig  # noqa: F401
    from tokenyard.engine.llm_engine import LLMEngine  # noqa: F401
    from tokenyard.entrypoints.llm import LLM  # noqa: F401
    from tokenyard.outputs import RequestOutput  # noqa: F401
    from tokenyard.sampling_params import InvalidParameterError, SamplingParams  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenyard' has no attribute {name!r}")
