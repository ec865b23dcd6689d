"""sched/, the block bookkeeping of kv/ and the cluster policies must not import torch (nor Ray): the simulator
reuses them unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tokenyard

PKG = Path(tokenyard.__file__).parent
PURE_DIRS = ["sched", "kv", "cluster", "sim"]   # cluster/runtime/ (Ray actors) is not pure


def _pure_modules() -> list[str]:
    mods = []
    for d in PURE_DIRS:
        for f in sorted((PKG / d).glob("*.py")):
            if f.stem == "tensors":  # kv/tensors.py may hold torch storage; nothing else in kv/ may
                continue
            mods.append(f"tokenyard.{d}" if f.stem == "__init__" else f"tokenyard.{d}.{f.stem}")
    return mods


def test_pure_modules_do_not_import_torch():
    mods = _pure_modules()
    assert len(mods) >= 6
    code = (
        "import sys\n"
        f"for m in {mods!r}:\n"
        "    __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))\n"
        "print('TORCH' if bad else 'CLEAN')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "CLEAN", f"torch imported by one of {mods}"
