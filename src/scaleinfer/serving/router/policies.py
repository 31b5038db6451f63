"""Routing policies of the data-parallel router: which healthy replica takes a request.

Pure Python, no I/O: a policy sees the router's view of each healthy replica (ReplicaLoad: requests and
estimated tokens it has outstanding) and what the router read from the request body (RouteInfo), and
returns its choice with the reason (a label of the router's metrics).

- round-robin: replicas in turn, whatever they hold.
- least-tokens: the replica with the fewest outstanding tokens (prompt estimate + max tokens of every
  request sent to it and not yet answered), ties in turn.
- prefix-affinity: requests whose prompts share a prefix go to the replica that served that prefix last,
  so its prefix cache (KV blocks) is reused; unless that replica is overloaded (more outstanding tokens
  than the least loaded one x `load_ratio` + `load_slack`), then, and for new prefixes, least-tokens.
  The prefix is matched in chunks of CHUNK_CHARS characters (about one 16-token KV block of text) through
  a hash chain, as SGLang's cache-aware router does with its approximate radix tree, but bounded: the
  first MAX_CHUNKS chunks, an LRU of MAX_ENTRIES chunk hashes per replica.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from scaleinfer.errors import ConfigError

CHUNK_CHARS = 64
"""Characters per prefix chunk: about one KV block (16 tokens) of English text."""
MAX_CHUNKS = 64
"""Chunks of a prompt's prefix considered (the first 4096 characters)."""
MAX_ENTRIES = 1 << 16
"""Chunk hashes remembered per replica (LRU): ~4M characters, more than a replica's KV cache holds."""


@dataclass
class ReplicaLoad:
    """What a policy knows of one replica: its place, its name, what it has outstanding."""

    index: int
    name: str
    outstanding_requests: int = 0
    outstanding_tokens: int = 0


@dataclass(frozen=True)
class RouteInfo:
    """What the router read from a request body to route it."""

    prefix_text: str = ""
    """The text whose prefix decides cache affinity (the prompt, or the conversation's turns)."""
    est_tokens: int = 0
    """Estimated tokens the request puts on a replica: prompt characters / 4 + max tokens, x n."""


@dataclass(frozen=True)
class Choice:
    replica: ReplicaLoad
    reason: str
    """round_robin | least_tokens | prefix_hit | prefix_overloaded | prefix_new (a metrics label)."""


class Policy(Protocol):
    name: str

    def choose(self, candidates: list[ReplicaLoad], info: RouteInfo) -> Choice:
        """candidates: the healthy replicas not yet tried for this request, in index order, never empty."""

    def forget(self, name: str) -> None:
        """The replica left rotation: whatever the policy remembers of its cache is gone."""


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: list[ReplicaLoad], info: RouteInfo) -> Choice:
        pick = candidates[self._turn % len(candidates)]
        self._turn += 1
        return Choice(pick, "round_robin")

    def forget(self, name: str) -> None:
        pass


class LeastTokens:
    name = "least-tokens"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: list[ReplicaLoad]) -> ReplicaLoad:
        """Fewest outstanding tokens, then fewest requests; ties go to each replica in turn."""
        self._turn += 1
        span = max(r.index for r in candidates) + 1
        return min(candidates, key=lambda r: (r.outstanding_tokens, r.outstanding_requests,
                                              (r.index - self._turn) % span))

    def choose(self, candidates: list[ReplicaLoad], info: RouteInfo) -> Choice:
        return Choice(self.pick(candidates), "least_tokens")

    def forget(self, name: str) -> None:
        pass


def prefix_chain(text: str, chunk: int = CHUNK_CHARS, max_chunks: int = MAX_CHUNKS) -> list[int]:
    """Hashes of text[:chunk], text[:2 chunk], ... (whole chunks only), each over the one before."""
    chain, h = [], 0
    for start in range(0, min(len(text) // chunk, max_chunks) * chunk, chunk):
        h = hash((h, text[start:start + chunk]))
        chain.append(h)
    return chain


class PrefixAffinity:
    name = "prefix-affinity"

    def __init__(self, load_ratio: float = 1.5, load_slack: int = 2048, max_entries: int = MAX_ENTRIES):
        if load_ratio < 1 or load_slack < 0:
            raise ConfigError(f"prefix-affinity needs load_ratio >= 1 and load_slack >= 0, got {load_ratio}, "
                              f"{load_slack}")
        self.load_ratio, self.load_slack, self.max_entries = load_ratio, load_slack, max_entries
        self._least = LeastTokens()
        self._seen: dict[str, OrderedDict[int, None]] = {}

    def matched(self, name: str, chain: list[int]) -> int:
        """How many leading chunks of `chain` the replica served last (as far as the LRU remembers)."""
        seen = self._seen.get(name)
        if not seen:
            return 0
        n = 0
        while n < len(chain) and chain[n] in seen:
            n += 1
        return n

    def choose(self, candidates: list[ReplicaLoad], info: RouteInfo) -> Choice:
        chain = prefix_chain(info.prefix_text)
        best, best_len = None, 0
        for r in candidates:   # longest match; among equal ones the least loaded
            n = self.matched(r.name, chain)
            if n > best_len or (n == best_len and best is not None and n and
                                r.outstanding_tokens < best.outstanding_tokens):
                best, best_len = r, n
        if best is None:
            choice = Choice(self._least.pick(candidates), "prefix_new")
        elif self._overloaded(best, candidates):
            choice = Choice(self._least.pick(candidates), "prefix_overloaded")
        else:
            choice = Choice(best, "prefix_hit")
        self._remember(choice.replica.name, chain)
        return choice

    def _overloaded(self, replica: ReplicaLoad, candidates: list[ReplicaLoad]) -> bool:
        least = min(r.outstanding_tokens for r in candidates)
        return replica.outstanding_tokens > least * self.load_ratio + self.load_slack

    def _remember(self, name: str, chain: list[int]) -> None:
        seen = self._seen.setdefault(name, OrderedDict())
        for h in chain:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_entries:
            seen.popitem(last=False)

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)


POLICIES = {p.name: p for p in (RoundRobin, LeastTokens, PrefixAffinity)}
DEFAULT_POLICY = "prefix-affinity"
"""The default: see the router's section of the README for the measurement behind it."""


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None
