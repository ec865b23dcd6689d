"""Cost models: how long one engine step takes, from the shape of the scheduler's decision. Pure Python.

A step's time depends on what it computes (tokens, sequences, the keys attention reads) and on the KV copies it
waits for. Three sources:

- ``ProfiledCost``: a ``tokenyard profile`` file, a piecewise-linear model fitted to steps measured on the real
  engine (decode-only steps and steps with prefill fitted apart: the engine runs them on different paths);
- ``VidurCost``: Vidur's measured GPU operator times (``mlp.csv``: every linear layer, norm, RoPE, activation
  per token count), with attention and the LM head from first principles (no attention profile is available);
- ``RooflineCost``: FLOPs against peak compute and bytes against memory bandwidth, from a model's shape and a
  device's datasheet.

Every model computes a decode-only step with ``decode_time(n, context)``, and ``step_time`` of a decode-only
shape calls exactly that, so a collapsed run of decode steps (``sim/instance.py``) sums the same floats as
stepping does.
"""

from __future__ import annotations

import bisect
import csv
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tokenyard.sched.output import SchedulerOutput

ARRAY_SPAN = 36   # spans of at least this many steps have their times computed as arrays (faster from ~35)
INF = float("inf")


@dataclass(frozen=True, slots=True)
class StepShape:
    num_tokens: int = 0       # tokens computed (the budget used)
    num_seqs: int = 0         # chunks
    num_decodes: int = 0      # 1-token chunks (a 1-token last prefill chunk is one: it costs what a decode costs)
    decode_context: int = 0   # keys the 1-token chunks read, summed
    prefill_attn: int = 0     # query-key pairs of the longer chunks: sum of q * start + q * (q + 1) / 2
    prefill_context: int = 0  # keys the longer chunks read (start + q), summed

    @classmethod
    def of(cls, out: SchedulerOutput) -> StepShape:
        t = n = nd = dc = pa = pc = 0
        for c in out.chunks:
            q = len(c.token_ids)
            t += q
            n += 1
            if q == 1:
                nd += 1
                dc += c.start_pos + 1
            else:
                pa += q * c.start_pos + q * (q + 1) // 2
                pc += c.start_pos + q
        return cls(t, n, nd, dc, pa, pc)

    @property
    def decode_only(self) -> bool:
        return self.num_decodes == self.num_seqs


class CostModel(ABC):
    """Seconds per step and per KV copy. ``num_kv_blocks``: the KV pool this device holds (None: not known)."""

    name: str = "cost"
    block_size: int = 16
    num_kv_blocks: int | None = None

    @abstractmethod
    def decode_time(self, num_seqs: int, context: int) -> float:
        """A step of ``num_seqs`` decodes reading ``context`` keys in all."""

    @abstractmethod
    def mixed_time(self, s: StepShape) -> float:
        """A step with prefill work."""

    def decode_ends(self, t: float, num_seqs: int, context: int, k: int, limit: float) -> list[float]:
        """End times of up to ``k`` decode steps of ``num_seqs`` sequences from ``t`` (the context growing by
        ``num_seqs`` a step), while a step starts before ``limit``: exactly ``t = t + decode_time(...)`` per step.

        Long spans take the models' array form of the same expression (NumPy's +, *, / and maximum round as
        Python's float operations do, and ``add.accumulate`` adds left to right), so the floats are the loop's;
        computed in pieces sized by how many steps fit before ``limit`` (a step takes at least the first one's
        time: no step gets shorter as the context grows)."""
        out: list[float] = []
        step = self._decode_step(num_seqs)
        while len(out) < k and t < limit:
            left = k - len(out)
            if left >= ARRAY_SPAN and limit != INF:
                left = min(left, max(ARRAY_SPAN, int((limit - t) / step(context)) + 2))
            steps = None
            if left >= ARRAY_SPAN:
                # the contexts as floats: whole numbers, exact below 2**53, as Python converts them
                steps = self._decode_steps(num_seqs, np.arange(context, context + num_seqs * left, num_seqs,
                                                               dtype=np.float64))
            if steps is None:   # one at a time
                while len(out) < k and t < limit:
                    t = t + step(context)
                    out.append(t)
                    context += num_seqs
                break
            steps[0] = t + steps[0]
            ends = np.add.accumulate(steps, out=steps)
            # step i starts at t (i = 0) or at ends[i - 1]: keep the steps that start before the limit
            m = left if limit == INF else 1 + int(np.searchsorted(ends[:-1], limit, side="left"))
            out.extend(ends[:m].tolist())
            t = out[-1]
            context += num_seqs * m
            if m < left:
                break
        return out

    def _decode_step(self, num_seqs: int) -> Callable[[int], float]:
        """``decode_time(num_seqs, context)`` as a function of the context, with what depends only on
        ``num_seqs`` computed once (the same float operations, so the same values)."""
        return lambda context: self.decode_time(num_seqs, context)

    def _decode_steps(self, num_seqs: int, contexts: np.ndarray) -> np.ndarray | None:
        """``decode_time(num_seqs, c)`` for every context in the float array (which it may overwrite), the same
        operations in the same order (None: this model has no array form; the loop runs)."""
        return None

    def step_time(self, s: StepShape) -> float:
        if s.num_seqs == 0:
            return 0.0
        if s.decode_only:
            return self.decode_time(s.num_seqs, s.decode_context)
        return self.mixed_time(s)

    # KV copies: a swap between device and host, and a migration between instances.
    swap_s_per_block: float = 0.0
    swap_s_per_copy: float = 0.0
    migration_s_per_block: float = 0.0
    migration_s_per_stage: float = 0.0

    def swap_time(self, num_blocks: int, num_copies: int) -> float:
        return num_blocks * self.swap_s_per_block + num_copies * self.swap_s_per_copy

    def migration_time(self, num_blocks: int) -> float:
        return num_blocks * self.migration_s_per_block + self.migration_s_per_stage

    def describe(self) -> dict:
        return {"name": self.name, "block_size": self.block_size, "num_kv_blocks": self.num_kv_blocks}


# --------------------------------------------------------------------------- a profile of the real engine
PROFILE_KIND = "tokenyard-profile"
DECODE_TERMS = ("per_context_token",)                   # beside the piecewise-linear function of sequences
MIXED_TERMS = ("per_seq", "per_decode_context_token", "per_prefill_attn_pair", "per_prefill_context_token")


def hat_basis(x: float, knots: list[float]) -> list[float]:
    """Piecewise-linear interpolation weights of ``x`` over ``knots`` (two non-zero, summing to 1); beyond the
    ends, the first or last segment continued (so a fitted function extrapolates linearly)."""
    m = len(knots)
    w = [0.0] * m
    if m == 1:
        w[0] = 1.0
        return w
    i = bisect.bisect_right(knots, x) - 1
    i = min(max(i, 0), m - 2)
    k0, k1 = knots[i], knots[i + 1]
    f = (x - k0) / (k1 - k0)
    w[i] = 1.0 - f
    w[i + 1] = f
    return w


def decode_features(num_seqs: int, context: int, knots: list[float]) -> list[float]:
    return [*hat_basis(num_seqs, knots), float(context)]


def mixed_features(s: StepShape, knots: list[float]) -> list[float]:
    return [*hat_basis(s.num_tokens, knots), float(s.num_seqs), float(s.decode_context), float(s.prefill_attn),
            float(s.prefill_context)]


class ProfiledCost(CostModel):
    """The model a ``tokenyard profile`` run fitted (seconds): a decode-only step is a piecewise-linear function
    of its sequences (knots at the measured batch sizes) plus a cost per key read; a step with prefill, a
    piecewise-linear function of its tokens plus costs per sequence, decode key, prefill query-key pair and
    prefill key. Both interpolate what was measured, as Vidur's tables do."""

    name = "profile"

    def __init__(self, data: dict, source: str = "") -> None:
        if data.get("kind") != PROFILE_KIND:
            raise ValueError(f"{source or 'profile'}: not a tokenyard profile (kind {data.get('kind')!r})")
        if data.get("version") != 2:
            raise ValueError(f"{source or 'profile'}: profile version {data.get('version')}; this tokenyard reads "
                             f"version 2 (run `tokenyard profile` again)")
        self.data = data
        self.source = source
        d, m = data["decode"], data["mixed"]
        self.d_knots = [float(x) for x in d["knots"]]
        self.d_vals = [float(x) for x in d["values"]]
        self.d_ctx = float(d["per_context_token"])
        self._bases: dict[int, float] = {}
        self.m_knots = [float(x) for x in m["knots"]]
        self.m_vals = [float(x) for x in m["values"]]
        self.m = [float(m[k]) for k in MIXED_TERMS]
        self.block_size = int(data["block_size"])
        self.num_kv_blocks = data.get("num_kv_blocks")
        copies = data.get("copies", {})
        self.swap_s_per_block = float(copies.get("swap_s_per_block", 0.0))
        self.swap_s_per_copy = float(copies.get("swap_s_per_copy", 0.0))
        self.migration_s_per_block = float(copies.get("migration_s_per_block", 0.0))
        self.migration_s_per_stage = float(copies.get("migration_s_per_stage", 0.0))

    @staticmethod
    def _interp(x: float, knots: list[float], vals: list[float]) -> float:
        if len(knots) == 1:
            return vals[0]
        i = bisect.bisect_right(knots, x) - 1
        i = min(max(i, 0), len(knots) - 2)
        k0 = knots[i]
        return vals[i] + (vals[i + 1] - vals[i]) * (x - k0) / (knots[i + 1] - k0)

    def _base(self, num_seqs: int) -> float:
        """The decode model's function of the batch size, kept per size (the same float either way)."""
        base = self._bases.get(num_seqs)
        if base is None:
            base = self._bases[num_seqs] = self._interp(num_seqs, self.d_knots, self.d_vals)
        return base

    def decode_time(self, num_seqs: int, context: int) -> float:
        return self._base(num_seqs) + self.d_ctx * context

    def _decode_step(self, num_seqs: int) -> Callable[[int], float]:
        base, dc = self._base(num_seqs), self.d_ctx   # decode_time's two terms
        return lambda context: base + dc * context

    def _decode_steps(self, num_seqs: int, contexts: np.ndarray) -> np.ndarray:
        contexts *= self.d_ctx
        contexts += self._base(num_seqs)
        return contexts

    def mixed_time(self, s: StepShape) -> float:
        m = self.m
        return (self._interp(s.num_tokens, self.m_knots, self.m_vals) + m[0] * s.num_seqs
                + m[1] * s.decode_context + m[2] * s.prefill_attn + m[3] * s.prefill_context)

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source, "device": self.data.get("device"),
                "model": self.data.get("model"), "fit": self.data.get("fit")}


# --------------------------------------------------------------------------- model shapes and devices (datasheets)
@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.num_kv_heads

    @property
    def layer_params(self) -> int:
        h = self.hidden
        return h * (h + 2 * self.kv_dim) + h * h + 3 * h * self.intermediate

    @property
    def weight_bytes(self) -> int:
        return (self.num_layers * self.layer_params + 2 * self.vocab * self.hidden) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_dim * self.dtype_bytes

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelShape:
        c = json.loads(Path(path).read_text())
        return cls(Path(path).parent.name or "model", c["num_hidden_layers"], c["hidden_size"],
                   c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]),
                   c["intermediate_size"], c["vocab_size"])


MODELS = {   # the architectures Vidur's profiles cover (public configs)
    "llama-2-7b": ModelShape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
    "llama-3-8b": ModelShape("llama-3-8b", 32, 4096, 32, 8, 14336, 128256),
    "llama-2-70b": ModelShape("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
}
VIDUR_DIRS = {"llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
              "llama-2-70b": "meta-llama/Llama-2-70b-hf"}


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    flops: float            # dense bf16 FLOP/s
    mem_bw: float           # bytes/s
    mem_bytes: float
    host_bw: float          # device <-> host copies, bytes/s (PCIe)
    net_bw: float = 25e9    # instance <-> instance (migration), bytes/s


DEVICES = {
    "a100": DeviceSpec("a100", 312e12, 2.04e12, 80e9, 25e9),
    "h100": DeviceSpec("h100", 989e12, 3.35e12, 80e9, 50e9),
    "h200": DeviceSpec("h200", 989e12, 4.8e12, 141e9, 50e9),
}


class _FirstPrinciples(CostModel):
    """Shared by the GPU models: attention and LM head from FLOPs and bytes, KV pool from device memory."""

    def __init__(self, model: ModelShape, device: DeviceSpec, *, mfu: float = 0.6, mbu: float = 0.7,
                 overhead_s: float = 0.002, block_size: int = 16, memory_utilization: float = 0.9,
                 num_kv_blocks: int | None = None) -> None:
        self.model, self.device = model, device
        self.mfu, self.mbu, self.overhead_s = mfu, mbu, overhead_s
        self.block_size = block_size
        per_block = model.kv_bytes_per_token * block_size
        if num_kv_blocks is None:
            free = device.mem_bytes * memory_utilization - model.weight_bytes
            if free < per_block:
                raise ValueError(f"{model.name} ({model.weight_bytes / 1e9:.0f} GB of weights) does not fit a "
                                 f"{device.name} with room for KV")
            num_kv_blocks = int(free // per_block)
        self.num_kv_blocks = num_kv_blocks
        self.swap_s_per_block = per_block / device.host_bw
        self.swap_s_per_copy = 5e-6
        self.migration_s_per_block = per_block / device.net_bw
        self.migration_s_per_stage = 1e-3
        m = model
        self._attn_flop = 4.0 * m.num_layers * m.num_heads * m.head_dim   # per query-key pair (QK and PV)
        self._kv_byte = float(m.kv_bytes_per_token)                          # per key read
        self._peak = device.flops * mfu
        self._bw = device.mem_bw * mbu
        self._bases: dict[int, float] = {}

    def attention_time(self, pairs: float, keys: float) -> float:
        return max(pairs * self._attn_flop / self._peak, keys * self._kv_byte / self._bw)

    def decode_base(self, num_seqs: int) -> float:
        """A decode step's time apart from attention."""
        raise NotImplementedError

    def _base(self, num_seqs: int) -> float:
        """``decode_base``, kept per batch size (the models are fixed once built; the same float either way)."""
        base = self._bases.get(num_seqs)
        if base is None:
            base = self._bases[num_seqs] = self.decode_base(num_seqs)
        return base

    def decode_time(self, num_seqs: int, context: int) -> float:
        # each decode query reads its context: query-key pairs = keys = context
        return self._base(num_seqs) + self.attention_time(context, context)

    def _decode_step(self, num_seqs: int) -> Callable[[int], float]:
        base, attn = self._base(num_seqs), self.attention_time
        return lambda context: base + attn(context, context)

    def _decode_steps(self, num_seqs: int, contexts: np.ndarray) -> np.ndarray:
        flops = contexts * self._attn_flop
        flops /= self._peak
        contexts *= self._kv_byte
        contexts /= self._bw
        np.maximum(flops, contexts, out=flops)
        flops += self._base(num_seqs)
        return flops

    def describe(self) -> dict:
        return {**super().describe(), "model": asdict(self.model), "device": asdict(self.device), "mfu": self.mfu,
                "mbu": self.mbu, "overhead_s": self.overhead_s}


class RooflineCost(_FirstPrinciples):
    """Every part of the step from FLOPs and bytes: linear layers read the weights once per step."""

    name = "roofline"

    def __init__(self, model: ModelShape, device: DeviceSpec, **kw) -> None:
        super().__init__(model, device, **kw)
        m = model
        self._flop_per_token = 2.0 * (m.num_layers * m.layer_params)
        self._head_flop = 2.0 * m.vocab * m.hidden
        self._weights = float(m.weight_bytes)

    def _linear(self, tokens: int, samples: int) -> float:
        flops = tokens * self._flop_per_token + samples * self._head_flop
        return max(flops / self._peak, self._weights / self._bw)

    def decode_base(self, num_seqs: int) -> float:
        return self.overhead_s + self._linear(num_seqs, num_seqs)

    def mixed_time(self, s: StepShape) -> float:
        return (self.overhead_s + self._linear(s.num_tokens, s.num_seqs)
                + self.attention_time(s.prefill_attn + s.decode_context, s.prefill_context + s.decode_context))


class VidurCost(_FirstPrinciples):
    """Vidur's measured operator times (median, tensor parallel 1) for the linear layers, norms, RoPE,
    activation and residual adds, interpolated in the number of tokens; attention and LM head as in the
    roofline (Vidur's attention profiles are not available)."""

    name = "vidur"
    PER_LAYER = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
                 "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "add")

    def __init__(self, csv_path: str | Path, model: ModelShape, device: DeviceSpec, *, tp: int = 1, **kw) -> None:
        super().__init__(model, device, **kw)
        self.csv_path = str(csv_path)
        rows = [r for r in csv.DictReader(open(csv_path, newline=""))
                if int(r["num_tensor_parallel_workers"]) == tp]
        if not rows:
            raise ValueError(f"{csv_path}: no rows for tensor parallel degree {tp}")
        rows.sort(key=lambda r: int(r["num_tokens"]))
        self._x = [int(r["num_tokens"]) for r in rows]
        ms, m = 1e-3, model
        self._y = [ms * (m.num_layers * sum(float(r[f"time_stats.{op}.median"]) for op in self.PER_LAYER)
                         + float(r["time_stats.emb.median"])) for r in rows]
        self._head_flop = 2.0 * m.vocab * m.hidden
        self._head_bytes = float(model.vocab * model.hidden * model.dtype_bytes)

    def layers_time(self, tokens: int) -> float:
        x, y = self._x, self._y
        if tokens <= x[0]:
            return y[0]
        i = bisect.bisect_left(x, tokens)
        if i == len(x):   # beyond the profile: linear in tokens from the last two points
            i = len(x) - 1
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def _head(self, samples: int) -> float:
        return max(samples * self._head_flop / self._peak, self._head_bytes / self._bw)

    def decode_base(self, num_seqs: int) -> float:
        return self.overhead_s + self.layers_time(num_seqs) + self._head(num_seqs)

    def mixed_time(self, s: StepShape) -> float:
        return (self.overhead_s + self.layers_time(s.num_tokens) + self._head(s.num_seqs)
                + self.attention_time(s.prefill_attn + s.decode_context, s.prefill_context + s.decode_context))

    def describe(self) -> dict:
        return {**super().describe(), "csv": self.csv_path}


# --------------------------------------------------------------------------- by name
def load_cost_model(spec: str, *, profiles_dir: str | Path | None = None, block_size: int = 16,
                    num_kv_blocks: int | None = None, overhead_s: float = 0.002) -> CostModel:
    """``PATH.json`` (a tokenyard profile), ``vidur:DEVICE:MODEL`` (e.g. ``vidur:h100:llama-2-7b``, from
    ``profiles_dir``) or ``roofline:DEVICE:MODEL`` (MODEL may be a config.json path)."""
    kind, _, rest = spec.partition(":")
    if kind in ("vidur", "roofline"):
        dev_name, _, model_name = rest.partition(":")
        device = DEVICES.get(dev_name)
        if device is None:
            raise ValueError(f"cost model {spec!r}: device {dev_name!r} is not one of {sorted(DEVICES)}")
        if model_name.endswith(".json"):
            model = ModelShape.from_hf_config(model_name)
        elif model_name in MODELS:
            model = MODELS[model_name]
        else:
            raise ValueError(f"cost model {spec!r}: model {model_name!r} is not one of {sorted(MODELS)} "
                             f"or a config.json path")
        kw = {"block_size": block_size, "num_kv_blocks": num_kv_blocks, "overhead_s": overhead_s}
        if kind == "roofline":
            return RooflineCost(model, device, **kw)
        if model_name not in VIDUR_DIRS:
            raise ValueError(f"cost model {spec!r}: Vidur profiles cover {sorted(VIDUR_DIRS)}")
        base = Path(profiles_dir) if profiles_dir else default_vidur_profiles()
        path = base / "compute" / dev_name / VIDUR_DIRS[model_name] / "mlp.csv"
        if not path.is_file():
            raise ValueError(f"cost model {spec!r}: no Vidur profile at {path} (--vidur-profiles DIR)")
        return VidurCost(path, model, device, **kw)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"cost model {spec!r}: no such profile file (or use vidur:DEVICE:MODEL, "
                         f"roofline:DEVICE:MODEL)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    cm = ProfiledCost(data, str(path))
    if num_kv_blocks is not None:
        cm.num_kv_blocks = num_kv_blocks
    if block_size != cm.block_size:
        raise ValueError(f"{path} was profiled with block size {cm.block_size}, not {block_size}")
    return cm


def default_vidur_profiles() -> Path:
    """``../shared/data/vidur-profiles`` next to the checkout, where the project keeps them."""
    here = Path(__file__).resolve().parents[2]
    for cand in (here.parent / "shared" / "data" / "vidur-profiles", here / "data" / "vidur-profiles"):
        if cand.is_dir():
            return cand
    return here.parent / "shared" / "data" / "vidur-profiles"


def fit_linear(rows: list[list[float]], ys: list[float]) -> tuple[list[float], float]:
    """Least squares with non-negative coefficients (active set: drop the most negative and refit); returns the
    coefficients and the mean relative error. Pure Python normal equations: a handful of terms."""
    k = len(rows[0])
    active = list(range(k))
    while True:
        coef = _lstsq([[r[j] for j in active] for r in rows], ys)
        worst = min(range(len(active)), key=lambda i: coef[i])
        if coef[worst] >= 0 or len(active) == 1:
            break
        del active[worst]
    full = [0.0] * k
    for j, c in zip(active, coef):
        full[j] = max(c, 0.0)
    err = sum(abs(sum(c * x for c, x in zip(full, r)) - y) / y for r, y in zip(rows, ys)) / len(ys)
    return full, err


def _lstsq(a: list[list[float]], y: list[float]) -> list[float]:
    """Weighted by 1/y (relative error matters: a 1 ms step is as important as a 100 ms one)."""
    k = len(a[0])
    scale = [max(max(abs(r[j]) for r in a), 1e-30) for j in range(k)]
    ata = [[0.0] * k for _ in range(k)]
    aty = [0.0] * k
    for r, v in zip(a, y):
        w = 1.0 / (v * v)
        x = [r[j] / scale[j] for j in range(k)]
        for i in range(k):
            aty[i] += w * x[i] * v
            for j in range(k):
                ata[i][j] += w * x[i] * x[j]
    for i in range(k):
        ata[i][i] += 1e-12
    # Gaussian elimination with partial pivoting
    m = [row[:] + [aty[i]] for i, row in enumerate(ata)]
    for c in range(k):
        p = max(range(c, k), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        if abs(m[c][c]) < 1e-300:
            continue
        for r in range(k):
            if r != c:
                f = m[r][c] / m[c][c]
                for j in range(c, k + 1):
                    m[r][j] -= f * m[c][j]
    return [(m[i][k] / m[i][i] if abs(m[i][i]) > 1e-300 else 0.0) / scale[i] for i in range(k)]
