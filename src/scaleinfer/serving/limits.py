"""The server's limits against oversized, slow or too many requests: their defaults (written once, here;
the `serve` flags take them from ServerLimits) and the checks on sizes that need no engine."""
from __future__ import annotations

from dataclasses import dataclass

from scaleinfer.errors import ConfigError


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of `scaleinfer serve`; the CLI flag of each field is in its docstring."""

    max_request_bytes: int = 4 << 20
    """--max-request-bytes: the largest request body; a bigger one gets 413 before it is read whole."""
    max_seqs_per_request: int = 128
    """--max-seqs-per-request: most sequences (prompts x n) one request may ask for; more get 400."""
    max_connections: int = 1024
    """--max-connections: most open connections; one more is answered 503 and closed at once."""
    max_header_bytes: int = 32 << 10
    """--max-header-bytes: the largest request head (request line + headers); bigger gets 431."""
    header_timeout_s: float = 10.0
    """--header-timeout: seconds a connection may take to send a request head; then it is closed."""

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_seqs_per_request", "max_connections", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.header_timeout_s > 0:
            raise ConfigError(f"--header-timeout must be > 0 seconds, got {self.header_timeout_s}")
