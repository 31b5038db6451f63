"""The results of encoder requests, in vLLM's shapes: out.outputs.embedding / .probs / .score."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]
    label: str
    """The most probable class's name (config.json id2label)."""

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class TokenClassificationOutput:
    tokens: list[str]
    labels: list[str]
    """The most probable class of each token (specials included)."""
    probs: list[list[float]]


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass
class ClassificationRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: ClassificationOutput
    finished: bool = True


@dataclass
class ScoringRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: ScoringOutput
    finished: bool = True


@dataclass
class TokenClassificationRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: TokenClassificationOutput
    finished: bool = True
