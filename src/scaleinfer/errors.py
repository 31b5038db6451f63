"""Every error scaleinfer raises on purpose. Imports nothing.

Messages are for people: what happened, the offending value, and how to fix it, on one line.
The CLI turns any ScaleInferError into that line and exit code 2; the server into OpenAI error JSON.
"""


class ScaleInferError(Exception):
    """Base class: an error a user can act on."""


class ConfigError(ScaleInferError):
    """An engine, cache or scheduler setting that cannot work (e.g. a KV budget too small for one block)."""


class UnsupportedModelError(ScaleInferError):
    """The checkpoint's architecture (or a tensor type inside it) is not one we implement."""


class WeightLoadError(ScaleInferError):
    """A model file is missing, truncated, corrupt, or cannot be fetched."""


class RequestError(ScaleInferError):
    """A request cannot be served as given: bad sampling parameters, a prompt longer than the context, ..."""


class EngineDeadError(ScaleInferError):
    """The engine loop died; no further requests can be served."""


class DistributedError(ScaleInferError):
    """A rank of a distributed engine never joined, died, or stopped answering within the timeout."""
