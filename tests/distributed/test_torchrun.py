"""Two "nodes" on localhost launched by torchrun, as on two machines (one rank per node, gloo between them,
as across hosts): `torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr A --master-port P
-m scaleinfer generate ... --tensor-parallel-size 2` on each node; node 0 prints what one process
generates (the default --quantization auto: Q4 tensors as w4a8, Q6/Q8 as w8a8), node 1 serves it and exits 0."""
from __future__ import annotations

import subprocess
import sys

from scaleinfer import LLM, SamplingParams
from tests.distributed.models import QWEN, needs
from tests.distributed.ranks import free_port

PROMPT = "def fibonacci(n):"
ENGINE = ["--model", QWEN, "--threads", "1", "--quantization", "auto", "--kv-cache-memory", "32MiB",
          "--max-model-len", "256"]


@needs(QWEN)
def test_two_torchrun_nodes_generate_what_one_process_does():
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "scaleinfer", "generate", PROMPT, *ENGINE, "--max-tokens", "8", "--temperature", "0",
         "--tensor-parallel-size", "2", "--distributed-communicator", "gloo", "--distributed-timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=400) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    llm = LLM(QWEN, threads=1, quantization="auto", kv_cache_memory="32MiB", max_model_len=256)
    expected = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    assert outs[0][0] == expected + "\n"   # the CLI ends the text with a newline
    assert outs[1][0] == ""   # node 1 only served
