"""The benchmark workloads, shared by every engine so that all measure the same token ids."""
from __future__ import annotations

import random
from dataclasses import dataclass

PREFILL_TOKENS = 512   # pp512, llama-bench convention
DECODE_TOKENS = 128    # tg128


@dataclass(frozen=True)
class MixedRequest:
    prompt_ids: list[int]
    output_len: int


def random_ids(rng: random.Random, n: int, vocab_size: int, low: int = 1000) -> list[int]:
    """Ordinary (non-special) token ids."""
    return [rng.randrange(low, vocab_size) for _ in range(n)]


def prefill_prompt(vocab_size: int) -> list[int]:
    return random_ids(random.Random(0), PREFILL_TOKENS, vocab_size)


def decode_prompt(vocab_size: int) -> list[int]:
    return random_ids(random.Random(1), 16, vocab_size)


def mixed_requests(vocab_size: int, num_requests: int = 64, prompt_range=(32, 512), output_range=(16, 256),
                   seed: int = 2) -> list[MixedRequest]:
    rng = random.Random(seed)
    return [MixedRequest(random_ids(rng, rng.randint(*prompt_range), vocab_size), rng.randint(*output_range))
            for _ in range(num_requests)]
