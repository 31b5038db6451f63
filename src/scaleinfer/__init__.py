"""scaleinfer: Transformer inference that scales. Public API only."""
from scaleinfer.config import EngineConfig
from scaleinfer.request import CompletionOutput, RequestOutput
from scaleinfer.sampling_params import BeamSearchParams, SamplingParams

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; import it on first use so `scaleinfer models` stays instant.
    if name == "LLM":
        from scaleinfer.llm import LLM

        return LLM
    raise AttributeError(name)
