"""The router's pure parts: the routing policies on fake replica loads, what it reads from request bodies,
and the merge of the replicas' /metrics."""
from __future__ import annotations

import json

import pytest

from scaleinfer.errors import ConfigError
from scaleinfer.serving.router.info import route_info
from scaleinfer.serving.router.metrics import merge_replica_metrics
from scaleinfer.serving.router.policies import (CHUNK_CHARS, LeastTokens, PrefixAffinity, ReplicaLoad, RoundRobin,
                                                RouteInfo, make_policy, prefix_chain)


def loads(*tokens: int) -> list[ReplicaLoad]:
    return [ReplicaLoad(i, f"r{i}", outstanding_requests=int(t > 0), outstanding_tokens=t)
            for i, t in enumerate(tokens)]


def test_round_robin_takes_replicas_in_turn_whatever_their_load():
    policy, replicas = RoundRobin(), loads(0, 10_000, 0)
    picks = [policy.choose(replicas, RouteInfo()).replica.name for _ in range(6)]
    assert picks == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_least_tokens_takes_the_least_loaded_and_spreads_ties():
    policy = LeastTokens()
    assert policy.choose(loads(500, 20, 300), RouteInfo()).replica.name == "r1"
    idle = loads(0, 0)
    assert {policy.choose(idle, RouteInfo()).replica.name for _ in range(4)} == {"r0", "r1"}


def test_least_tokens_follows_the_load_as_requests_arrive():
    policy, replicas = LeastTokens(), loads(0, 0)
    for est in (400, 100, 100, 100, 100):
        r = policy.choose(replicas, RouteInfo(est_tokens=est)).replica
        r.outstanding_tokens += est
        r.outstanding_requests += 1
    assert sorted(r.outstanding_tokens for r in replicas) == [400, 400]


SYSTEM = "You are a careful assistant who answers questions about the history of science. " * 3


def test_prefix_affinity_sends_a_shared_prefix_to_the_replica_that_served_it():
    policy, replicas = PrefixAffinity(), loads(0, 0, 0)
    first = policy.choose(replicas, RouteInfo(SYSTEM + "Who was Galileo?"))
    assert first.reason == "prefix_new"
    for question in ("Who was Newton?", "What did Lavoisier find?", "Why did Kepler matter?"):
        again = policy.choose(replicas, RouteInfo(SYSTEM + question))
        assert (again.replica.name, again.reason) == (first.replica.name, "prefix_hit")


def test_prefix_affinity_spreads_different_prefixes_by_load():
    policy, replicas = PrefixAffinity(), loads(0, 0)
    for i in range(4):
        c = policy.choose(replicas, RouteInfo(f"{i} " * CHUNK_CHARS, est_tokens=100))
        c.replica.outstanding_tokens += 100
    assert [r.outstanding_tokens for r in replicas] == [200, 200]


def test_prefix_affinity_leaves_an_overloaded_replica_for_the_least_loaded():
    policy = PrefixAffinity(load_ratio=1.5, load_slack=1000)
    replicas = loads(0, 0)
    home = policy.choose(replicas, RouteInfo(SYSTEM)).replica
    other = replicas[1 - home.index]
    home.outstanding_tokens, other.outstanding_tokens = 1000, 0   # within 0 * 1.5 + 1000
    assert policy.choose(replicas, RouteInfo(SYSTEM + "a")).reason == "prefix_hit"
    home.outstanding_tokens = 1001
    c = policy.choose(replicas, RouteInfo(SYSTEM + "b"))
    assert (c.replica.name, c.reason) == (other.name, "prefix_overloaded")
    # both now hold the prefix: the longest match wins, and among equal matches the less loaded
    other.outstanding_tokens = 5000
    assert policy.choose(replicas, RouteInfo(SYSTEM + "c")).replica is home


def test_prefix_affinity_forgets_a_replica_that_left_rotation():
    policy, replicas = PrefixAffinity(), loads(0, 0)
    home = policy.choose(replicas, RouteInfo(SYSTEM)).replica
    policy.forget(home.name)
    assert policy.matched(home.name, prefix_chain(SYSTEM)) == 0


def test_prefix_chain_counts_whole_chunks_and_stops_at_the_first_difference():
    a, b = prefix_chain("x" * 200), prefix_chain("x" * 130 + "y" * 70)
    assert len(a) == 200 // CHUNK_CHARS and a[:2] == b[:2] and a[2] != b[2]
    assert prefix_chain("short") == []


def test_make_policy_names_the_choices():
    assert make_policy("least-tokens").name == "least-tokens"
    with pytest.raises(ConfigError, match="round-robin, least-tokens, prefix-affinity"):
        make_policy("random")


def test_route_info_reads_prompts_messages_and_max_tokens():
    chat = route_info("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "system", "content": "S" * 40}, {"role": "user", "content": "hi"}],
         "max_tokens": 10, "n": 2}).encode())
    assert chat.prefix_text.startswith("<system>" + "S" * 40) and chat.est_tokens == (len(chat.prefix_text) // 4 + 20)
    comp = route_info("/v1/completions", json.dumps({"prompt": ["abcd" * 10, "x"], "max_tokens": 5}).encode())
    assert comp.prefix_text == "abcd" * 10 and comp.est_tokens == 2 * (10 + 5)
    ids = route_info("/v1/completions", json.dumps({"prompt": [1, 2, 3]}).encode())
    assert ids.prefix_text == "1 2 3" and ids.est_tokens == 1 + 16
    assert route_info("/v1/completions", b"not json") == RouteInfo()
    assert route_info("/v1/completions", b"[1, 2]") == RouteInfo()


def test_merged_metrics_label_each_replica_and_keep_one_header_per_family():
    text = ("# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3.0\n"
            "# HELP b B.\n# TYPE b gauge\nb 2.0\n")
    merged = merge_replica_metrics({"r0": text, "r1": text.replace("3.0", "4.0")}).splitlines()
    assert merged == ["# HELP a_total A.", "# TYPE a_total counter", 'a_total{replica="r0",x="1"} 3.0',
                      'a_total{replica="r1",x="1"} 4.0', "# HELP b B.", "# TYPE b gauge", 'b{replica="r0"} 2.0',
                      'b{replica="r1"} 2.0']
    assert merge_replica_metrics({}) == ""
