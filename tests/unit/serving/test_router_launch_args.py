"""What `serve --data-parallel-size N` hands its replicas: every engine flag as parsed (switches only when
they differ from their default), never --threads (split instead), never the router's own flags (address,
key, TLS); and the thread split."""
from __future__ import annotations

import pytest

from scaleinfer.cli import build_parser
from scaleinfer.cli.serve import _replica_argv
from scaleinfer.errors import ConfigError
from scaleinfer.serving.router.launch import split_threads


def test_replicas_get_the_engine_flags_and_the_per_replica_server_flags_only():
    args = build_parser().parse_args(["serve", "--data-parallel-size", "2", "--quantization", "none",
                                      "--no-enable-prefix-caching", "--threads", "4", "--api-key", "k",
                                      "--port", "9000", "--max-waiting", "8", "--ssl-certfile", "c.pem"])
    engine = _replica_argv(args, args.engine_actions)
    assert engine[engine.index("--quantization") + 1] == "none" and "--no-enable-prefix-caching" in engine
    assert "--threads" not in engine and "--model" in engine
    server = _replica_argv(args, args.replica_server_actions)
    assert server[server.index("--max-waiting") + 1] == "8"
    for flag in ("--api-key", "--port", "--host", "--ssl-certfile", "--data-parallel-size", "--router-policy"):
        assert flag not in engine + server
    default = build_parser().parse_args(["serve"])
    assert "--enable-prefix-caching" not in _replica_argv(default, default.engine_actions)   # the default: unsaid


def test_threads_are_split_unless_given_per_replica():
    assert split_threads(4, 2, None) == 2
    assert split_threads(1, 2, None) == 1
    assert split_threads(8, 2, 3) == 3
    with pytest.raises(ConfigError, match="--replica-threads"):
        split_threads(8, 2, 0)
