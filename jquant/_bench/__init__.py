"""Benchmark harness behind ``python -m jquant.bench`` (internal).

Each suite module in this package exposes ``run(ctx) -> list[Row]``. A row times one
operation for jquant, torch (when installed) and a yardstick (a jitted copy of the same
tensor), each the median of repeated calls after warm-up, all in one process, and the
table prints the ratios jquant/torch and jquant/copy. Absolute times are printed for
context only; nothing here gates on them.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

__all__ = ["Row", "Context", "timeit", "copy_time", "format_table"]


@dataclasses.dataclass
class Row:
    op: str
    size: str
    jquant_ms: float
    torch_ms: Optional[float] = None
    copy_ms: Optional[float] = None
    note: str = ""

    @property
    def vs_torch(self):
        return None if not self.torch_ms else self.jquant_ms / self.torch_ms

    @property
    def vs_copy(self):
        return None if not self.copy_ms else self.jquant_ms / self.copy_ms


@dataclasses.dataclass
class Context:
    repeats: int = 20
    warmup: int = 3
    quick: bool = False
    torch: object = None  # the torch module, or None
    sizes: tuple = (10 ** 6, 16 * 10 ** 6)
    _copy_cache: dict = dataclasses.field(default_factory=dict)


def _block(out):
    jax.block_until_ready(out)
    return out


def timeit(fn: Callable[[], object], ctx: Context, repeats: Optional[int] = None) -> float:
    """Median wall time of ``fn()`` in ms after ``ctx.warmup`` calls (JAX outputs are blocked on)."""
    for _ in range(ctx.warmup):
        _block(fn())
    times = []
    for _ in range(repeats or ctx.repeats):
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def copy_time(n: int, ctx: Context) -> float:
    """Median time of a jitted copy of an ``n``-element float32 tensor (bandwidth yardstick)."""
    if n not in ctx._copy_cache:
        x = jnp.arange(n, dtype=jnp.float32)
        copy = jax.jit(lambda a: a.copy())
        # a.copy() under jit may alias; force a new buffer with a no-op arithmetic op
        copy = jax.jit(lambda a: a * jnp.float32(1.0) + jnp.float32(0.0))
        ctx._copy_cache[n] = timeit(lambda: copy(x), ctx)
    return ctx._copy_cache[n]


def _fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def format_table(rows: list[Row]) -> str:
    header = ("op", "size", "jquant ms", "torch ms", "copy ms", "jq/torch", "jq/copy", "note")
    lines = [header]
    for r in rows:
        lines.append((r.op, r.size, _fmt(r.jquant_ms), _fmt(r.torch_ms), _fmt(r.copy_ms),
                      _fmt(r.vs_torch, 2), _fmt(r.vs_copy, 2), r.note))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        out.append(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        if j == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)
