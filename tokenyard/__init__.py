"""tokenyard: an LLM serving system that schedules requests at every level.

The public names load lazily, so ``import tokenyard.sched`` (pure Python, used by the simulator) does not
pull in torch through this package's ``__init__``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

# OpenMP threads (torch's ATen ops) that spin after each parallel region take the cores from the C++ kernels'
# own thread pool, and the pool's spinning workers from them: on 2 cores a 128-token prefill of the bundled model
# took 340 ms instead of 100, a batch-32 decode step 136 ms instead of 72. Sleeping OpenMP threads cost a wake-up
# per region and win everywhere measured. libgomp reads this once, when torch loads it: so here, before any
# tokenyard module imports torch (a program that imports torch first keeps its own setting). An explicit
# setting in the environment wins.
#: True when torch was loaded before tokenyard with no OMP_WAIT_POLICY set: too late for the setting above
#: (the CPU engine warns then).
OMP_SETTING_MISSED = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
