"""PipeLinks keeps a bounded number of sends alive: a gloo send never reports itself complete until it is
waited on, so sends older than the steps in flight are waited on (oldest first) instead of piling up."""
from __future__ import annotations

import argparse

import pytest
import torch

from scaleinfer.cli.common import parallel_args, parallel_config
from scaleinfer.distributed import pipeline
from scaleinfer.distributed.pipeline import SENDS_PER_STEP, PipeLinks
from scaleinfer.distributed.stages import PPStage
from scaleinfer.errors import ConfigError


class GlooLikeWork:
    """is_completed() stays False until wait(), as a gloo isend's work does."""

    waited: list[int] = []

    def __init__(self, n: int):
        self.n, self.done = n, False

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> bool:
        self.done = True
        GlooLikeWork.waited.append(self.n)
        return True


def test_sends_older_than_the_steps_in_flight_are_waited_on(monkeypatch):
    sent = []

    def isend(t, dst, group=None, tag=0):
        sent.append(t)
        return GlooLikeWork(len(sent) - 1)

    monkeypatch.setattr(pipeline.dist, "isend", isend)
    GlooLikeWork.waited = []
    links = PipeLinks(PPStage(0, 2, 0, 1, 2), None, 1, None, None, False, steps_in_flight=2)
    keep = SENDS_PER_STEP * (2 + 2)
    for step in range(100):
        links.send_step(torch.tensor([0, 1, 2, 3]))
        links.isend(torch.zeros(8), 1, None, pipeline.TAG_STREAM)
        assert len(links.pending) <= keep
    assert len(sent) == 300
    assert GlooLikeWork.waited == list(range(300 - keep))   # in order, and only the old ones
    assert [x for _, x in links.pending] == sent[-keep:]   # the newest still alive until received
    links.drain()
    assert links.pending == [] and GlooLikeWork.waited == list(range(300))


def test_micro_batches_flag_reaches_the_config():
    p = argparse.ArgumentParser()
    parallel_args(p)
    pc = parallel_config(p.parse_args(["-pp", "2", "--pipeline-micro-batches", "3"]))
    assert pc.pipeline_micro_batches == 3 and pc.steps_in_flight == 3
    assert parallel_config(p.parse_args(["-pp", "2"])).steps_in_flight == 2   # default: one per stage
    with pytest.raises(ConfigError, match="--pipeline-micro-batches must be >= 1"):
        parallel_config(p.parse_args(["-pp", "2", "--pipeline-micro-batches", "0"]))
