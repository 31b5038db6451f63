"""Attention patterns as data: which earlier positions a query may attend, and which K/V stay alive.

A pattern is a small frozen description that an attention layer receives (never code scattered
through models). Every pattern is causal on top of its own rule. Positions are token positions in
the request's sequence (0 = first prompt token).

    causal             k <= q
    window(W)          k <= q and q - k < W                     (Mistral, Gemma local layers)
    sinks(S, W)        k <= q and (k < S or q - k < W)          (StreamingLLM, Xiao et al. 2023)
    local_global(W, G) k <= q and (q - k < W or k in G or q in G)   (Longformer, Beltagy et al. 2020)
    block_sparse(B, L, C) on blocks qb = q // B, kb = k // B:
                       k <= q and (qb - kb < L or kb % C == C - 1)   (Sparse Transformer "fixed",
                       Child et al. 2019: a local band of L blocks plus every C-th block as a summary)

Each pattern gives three views of itself:
- `allows(q_pos, k_pos)`: the dense boolean mask, the oracle that tests compare fast paths with;
- `key_ranges(q_lo, q_hi)`: sorted disjoint [start, end) ranges of key positions that queries in
  [q_lo, q_hi) may attend (a superset of the union, exact per range edges); the attention backend
  gathers only these keys, so compute and reads follow the pattern;
- `live_ranges(q_next)`: key ranges that a query at q_next or later may still attend; the block
  manager frees every KV block outside them, which keeps a window pattern's memory O(W + S).

Text form (the `--attention-pattern` flag, `parse_pattern`): "causal", "window=4096",
"sinks=4,window=1020" (add ",positions=cache" for StreamingLLM's positions within the cache), "window=256,global=0:64" (global positions as start:end ranges, joined by
"+"), "block=64,local=4,stride=8".

Pure Python (no torch import): the scheduler and block manager use live_ranges.
"""
from __future__ import annotations

from dataclasses import dataclass

from scaleinfer.errors import ConfigError

Ranges = list[tuple[int, int]]


def _merge(ranges: Ranges) -> Ranges:
    """Sort and merge [start, end) ranges, dropping empty ones."""
    out: Ranges = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


@dataclass(frozen=True)
class AttentionPattern:
    """Causal attention restricted by an optional window, sinks, global positions or block sparsity."""

    window: int | None = None
    """Keys with q - k < window are visible (the query itself included); None = unbounded."""
    sinks: int = 0
    """The first `sinks` positions stay visible to every query (and alive in the cache)."""
    global_ranges: tuple[tuple[int, int], ...] = ()
    """Longformer global positions as [start, end) ranges: they see and are seen by everyone."""
    block: int = 0
    """Block-sparse: block size in tokens (0 = not block-sparse)."""
    local_blocks: int = 0
    """Block-sparse: query block qb sees key blocks qb - local_blocks + 1 .. qb."""
    stride: int = 0
    """Block-sparse: key blocks with kb % stride == stride - 1 are summaries everyone sees."""
    cache_positions: bool = False
    """Sinks + window only (StreamingLLM's positions within the cache): once the window has left the
    sinks behind, a query sees each sink at distance sinks + window - 1 - k instead of q - k, so no
    query-key distance ever exceeds sinks + window and a stream may run past the model's trained
    positions. Text form: positions=cache."""

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ConfigError(f"attention window must be >= 1 token, got {self.window}")
        if self.sinks < 0:
            raise ConfigError(f"attention sinks must be >= 0, got {self.sinks}")
        if self.sinks and self.window is None:
            raise ConfigError("attention sinks need a window (e.g. sinks=4,window=1020)")
        if self.global_ranges and self.window is None:
            raise ConfigError("global positions need a window (e.g. window=256,global=0:64)")
        if self.block:
            if self.local_blocks < 1 or self.stride < 1:
                raise ConfigError("block-sparse attention needs local >= 1 and stride >= 1 "
                                  "(e.g. block=64,local=4,stride=8)")
            if self.window is not None or self.sinks or self.global_ranges:
                raise ConfigError("block-sparse attention cannot be combined with window/sinks/global")
        if self.cache_positions and not self.sinks:
            raise ConfigError("positions=cache applies to sinks + window (e.g. sinks=4,window=1020,positions=cache)")

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def causal(cls) -> "AttentionPattern":
        return cls()

    @classmethod
    def sliding_window(cls, window: int) -> "AttentionPattern":
        return cls(window=window)

    @classmethod
    def with_sinks(cls, sinks: int, window: int) -> "AttentionPattern":
        return cls(window=window, sinks=sinks)

    @classmethod
    def local_global(cls, window: int, global_ranges: Ranges) -> "AttentionPattern":
        return cls(window=window, global_ranges=tuple(_merge(list(global_ranges))))

    @classmethod
    def block_sparse(cls, block: int, local_blocks: int, stride: int) -> "AttentionPattern":
        return cls(block=block, local_blocks=local_blocks, stride=stride)

    # ---- properties ----------------------------------------------------------------------------
    @property
    def is_causal(self) -> bool:
        """Plain causal attention (the backend's default paths apply)."""
        return self.window is None and not self.block

    @property
    def distance_bounded(self) -> bool:
        """No query-key distance exceeds a constant: a stream may outrun the model's trained positions."""
        return self.window is not None and not self.global_ranges and (not self.sinks or self.cache_positions)

    def sink_shift(self, q):
        """How much nearer than q - k a query at q sees the sinks (0 unless positions=cache and the
        window has moved past them). Works on ints and tensors."""
        if not self.cache_positions:
            return q * 0
        d = q - (self.sinks + self.window - 1)
        return d.clamp(min=0) if hasattr(d, "clamp") else max(d, 0)

    @property
    def kind(self) -> str:
        if self.block:
            return "block_sparse"
        if self.global_ranges:
            return "local_global"
        if self.sinks:
            return "sinks"
        return "window" if self.window is not None else "causal"

    def __str__(self) -> str:
        if self.block:
            return f"block={self.block},local={self.local_blocks},stride={self.stride}"
        parts = []
        if self.sinks:
            parts.append(f"sinks={self.sinks}")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.global_ranges:
            parts.append("global=" + "+".join(f"{s}:{e}" for s, e in self.global_ranges))
        if self.cache_positions:
            parts.append("positions=cache")
        return ",".join(parts) or "causal"

    # ---- the oracle ----------------------------------------------------------------------------
    def allows(self, q_pos, k_pos):
        """Dense mask: True where the query at q_pos may attend the key at k_pos (torch tensors or
        numpy arrays of int positions, broadcasting)."""
        ok = k_pos <= q_pos
        if self.block:
            qb, kb = q_pos // self.block, k_pos // self.block
            return ok & ((qb - kb < self.local_blocks) | (kb % self.stride == self.stride - 1))
        if self.window is None:
            return ok
        rule = (q_pos - k_pos) < self.window
        if self.sinks:
            rule = rule | (k_pos < self.sinks)
        for s, e in self.global_ranges:
            rule = rule | ((k_pos >= s) & (k_pos < e)) | ((q_pos >= s) & (q_pos < e))
        return ok & rule

    # ---- what the fast path gathers ------------------------------------------------------------
    def key_ranges(self, q_lo: int, q_hi: int) -> Ranges:
        """Key ranges that queries at positions [q_lo, q_hi) may attend (exact union, merged)."""
        if q_hi <= q_lo:
            return []
        if self.block:
            b, c = self.block, self.stride
            qb_lo, qb_hi = q_lo // b, (q_hi - 1) // b
            ranges = [(max(0, qb_lo - self.local_blocks + 1) * b, q_hi)]
            # summary blocks before the local band
            first_local = max(0, qb_lo - self.local_blocks + 1)
            kb = c - 1
            while kb < first_local and kb <= qb_hi:
                ranges.append((kb * b, (kb + 1) * b))
                kb += c
            return _merge(ranges)
        if self.window is None:
            return [(0, q_hi)]
        ranges = [(max(0, q_lo - self.window + 1), q_hi)]
        if self.sinks:
            ranges.append((0, min(self.sinks, q_hi)))
        for s, e in self.global_ranges:
            if s < q_hi and e > q_lo:  # a global query in the tile sees everything before it
                return [(0, q_hi)]
            ranges.append((s, min(e, q_hi)))
        return _merge(ranges)

    def live_ranges(self, q_next: int) -> Ranges:
        """Key ranges among [0, q_next) that a query at q_next or later may still attend.

        A global position still ahead (a global query sees everything) keeps the whole context."""
        if self.block:
            b, c = self.block, self.stride
            qb = q_next // b
            ranges = [(max(0, qb - self.local_blocks + 1) * b, q_next)]
            ranges += [(kb * b, min((kb + 1) * b, q_next)) for kb in range(c - 1, qb, c)]
            return _merge(ranges)
        if self.window is None or any(e > q_next for _, e in self.global_ranges):
            return [(0, q_next)] if q_next else []
        ranges = [(max(0, q_next - self.window + 1), q_next), (0, min(self.sinks, q_next))]
        ranges += [(s, min(e, q_next)) for s, e in self.global_ranges]
        return _merge(ranges)


CAUSAL = AttentionPattern()


def union_live_ranges(patterns: list[AttentionPattern], q_next: int) -> Ranges:
    """Keys any of the layers' patterns may still attend (the KV policy of a model whose layers
    share one block table)."""
    ranges: Ranges = []
    for p in set(patterns):
        ranges += p.live_ranges(q_next)
        if ranges and ranges[0] == (0, q_next):
            return [(0, q_next)] if q_next else []
    return _merge(ranges)


def parse_pattern(text: str) -> AttentionPattern:
    """Parse the `--attention-pattern` text form (see the module docstring)."""
    spec = text.strip().lower()
    if spec in ("causal", "full", "dense", ""):
        return CAUSAL
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ConfigError(f"cannot read attention pattern {text!r}: {part!r} is not key=value; write e.g. "
                              f"causal, window=4096, sinks=4,window=1020, window=256,global=0:64 or "
                              f"block=64,local=4,stride=8")
        fields[key.strip()] = value.strip()
    known = {"window", "sinks", "global", "block", "local", "stride", "positions"}
    if unknown := set(fields) - known:
        raise ConfigError(f"unknown attention pattern key(s) {sorted(unknown)} in {text!r}; "
                          f"known: {', '.join(sorted(known))}")

    def number(key: str) -> int:
        try:
            return int(fields[key])
        except ValueError:
            raise ConfigError(f"attention pattern {key}={fields[key]!r} is not an integer") from None

    if "block" in fields:
        missing = [k for k in ("local", "stride") if k not in fields]
        if missing:
            raise ConfigError(f"block-sparse pattern {text!r} needs {' and '.join(missing)} "
                              f"(e.g. block=64,local=4,stride=8)")
        if set(fields) - {"block", "local", "stride"}:
            raise ConfigError("block-sparse attention cannot be combined with window/sinks/global")
        return AttentionPattern.block_sparse(number("block"), number("local"), number("stride"))
    positions = fields.pop("positions", "text")
    if positions not in ("text", "cache"):
        raise ConfigError(f"positions={positions!r}: write positions=cache (StreamingLLM) or positions=text")
    if "window" not in fields:
        raise ConfigError(f"attention pattern {text!r} needs a window (e.g. window=4096)")
    global_ranges: Ranges = []
    if "global" in fields:
        for r in fields["global"].split("+"):
            s, sep, e = r.partition(":")
            try:
                start, end = int(s), int(e)
            except ValueError:
                raise ConfigError(f"cannot read global range {r!r}; write start:end, e.g. global=0:64") from None
            if not sep or end <= start or start < 0:
                raise ConfigError(f"global range {r!r} must be start:end with 0 <= start < end")
            global_ranges.append((start, end))
    return AttentionPattern(window=number("window"), sinks=number("sinks") if "sinks" in fields else 0,
                            global_ranges=tuple(_merge(global_ranges)), cache_positions=positions == "cache")
