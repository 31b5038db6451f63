"""LLM(data_parallel_size=2): the prompts spread over two engine processes come back in input order with
the same greedy tokens as one process; a dead worker is a one-line EngineDeadError, not a hang. Plus the
pure split of a batch by cost."""
from __future__ import annotations

import pytest

from scaleinfer.engine.data_parallel import shard

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", [1, 2, 3, 4, 5], "Water boils at",
           "The largest planet is"]
SMALL = dict(quantization="none", max_model_len=256, kv_cache_memory="64MiB")


def test_shard_balances_cost_and_keeps_every_index_once():
    costs = [100, 1, 1, 50, 50, 2]
    parts = shard(costs, 2)
    assert sorted(i for p in parts for i in p) == list(range(6))
    assert sorted(sum(costs[i] for i in p) for p in parts) == [102, 102]
    assert shard([5], 3) == [[0], [], []]


@pytest.mark.slow
def test_data_parallel_generate_matches_one_process_in_input_order():
    from scaleinfer import LLM, SamplingParams
    from scaleinfer.errors import EngineDeadError

    params = SamplingParams(temperature=0, max_tokens=6)
    one = LLM(threads=1, **SMALL).generate(PROMPTS, params)
    dp = LLM(threads=2, data_parallel_size=2, **SMALL)
    try:
        two = dp.generate(PROMPTS, params)
        assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]
        assert [o.prompt_token_ids for o in two] == [o.prompt_token_ids for o in one]
        assert dp.chat([{"role": "user", "content": "Hi"}], params)[0].outputs[0].text
        dp._dp._workers[1].kill()
        with pytest.raises(EngineDeadError, match="data-parallel worker 1 died"):
            dp.generate(PROMPTS, params)
    finally:
        dp.shutdown()
