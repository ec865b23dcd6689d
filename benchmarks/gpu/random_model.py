"""A seeded random-weight copy of a model: its config and tokenizer files, new weights (no download, nothing to
carry but a few MB of JSON). The GPU checks serve such a copy of SmolLM2-135M where the bundled GGUF is not
installed; scheduling and copy costs depend on the shapes, not on the weights' values.

    python benchmarks/gpu/random_model.py --like DIR_WITH_CONFIG_AND_TOKENIZER --out /tmp/model
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", required=True, help="directory with config.json and the tokenizer files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    src, out = Path(args.like), Path(args.out)
    cfg = AutoConfig.from_pretrained(str(src))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in src.iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    print(f"wrote a random-weight {cfg.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters) to {out}")


if __name__ == "__main__":
    main()
