"""Adapters that run the benchmark workloads on one engine each: scaleinfer and HF transformers.

Each adapter measures one engine in its own process (so peak RSS is that engine's alone). prefill_once
and decode_once time one round each; bench/core.py interleaves the engines' rounds.
"""
from __future__ import annotations

import time

import torch

from scaleinfer.bench.workloads import DECODE_TOKENS, MixedRequest


class ScaleInferAdapter:
    name = "scaleinfer"

    def __init__(self, model: str, threads: int, max_num_seqs: int, kv_cache_memory: str = "2GiB",
                 quantization: str = "none", kv_cache_dtype: str = "auto"):
        from scaleinfer.llm import LLM

        start = time.perf_counter()
        self.llm = LLM(model, threads=threads, max_num_seqs=max_num_seqs, max_num_batched_tokens=512,
                       kv_cache_memory=kv_cache_memory, max_model_len=2048, quantization=quantization,
                       kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False)  # repeats must recompute
        self.mode = quantization + ("" if kv_cache_dtype == "auto" else f"+kv-{kv_cache_dtype}")
        self.load_s = time.perf_counter() - start
        self.vocab_size = self.llm.engine.model_config.vocab_size

    def _params(self, n: int):
        from scaleinfer.sampling_params import SamplingParams

        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def prefill_once(self, ids: list[int]) -> float:
        """Seconds for the prompt (and its first token)."""
        start = time.perf_counter()
        self.llm.generate([ids], self._params(1))
        return time.perf_counter() - start

    def decode_once(self, ids: list[int]) -> tuple[float, list[int]]:
        """Seconds per token after the first of DECODE_TOKENS greedy ones, and the tokens."""
        first = None
        for out in self.llm.stream(ids, self._params(DECODE_TOKENS)):
            if first is None:
                first = time.perf_counter()
        return (time.perf_counter() - first) / (DECODE_TOKENS - 1), list(out.outputs[0].token_ids)

    def mixed(self, requests: list[MixedRequest]) -> dict:
        from scaleinfer.sampling_params import SamplingParams

        params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
        start = time.perf_counter()
        outs = self.llm.generate([r.prompt_ids for r in requests], params)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"seconds": elapsed, "output_tokens": generated,
                "max_batch_size": self.llm.engine.stats.max_batch_size}


class HFAdapter:
    name = "hf-transformers"
    mode = "fp32"

    def __init__(self, gguf_path: str, threads: int, concurrency: int):
        import os

        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        start = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path),
                                                          gguf_file=os.path.basename(gguf_path),
                                                          torch_dtype=torch.float32)
        self.model.eval()
        self.load_s = time.perf_counter() - start
        self.vocab_size = self.model.config.vocab_size
        self.concurrency = concurrency

    @torch.inference_mode()
    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, pad_token_id=0)

    @torch.inference_mode()
    def prefill_once(self, ids: list[int]) -> float:
        x = torch.tensor([ids])
        start = time.perf_counter()
        self.model(x)
        return time.perf_counter() - start

    def decode_once(self, ids: list[int]) -> tuple[float, list[int]]:
        x = torch.tensor([ids])
        mask = torch.ones_like(x)
        start = time.perf_counter()
        self._generate(x, mask, 1)
        t1 = time.perf_counter() - start
        start = time.perf_counter()
        out = self._generate(x, mask, DECODE_TOKENS)
        return (time.perf_counter() - start - t1) / (DECODE_TOKENS - 1), out[0, len(ids):].tolist()

    def mixed(self, requests: list[MixedRequest]) -> dict:
        """Static batching (HF's way): groups of `concurrency`, left-padded, run to the longest output."""
        start = time.perf_counter()
        useful = 0
        for i in range(0, len(requests), self.concurrency):
            group = requests[i:i + self.concurrency]
            width = max(len(r.prompt_ids) for r in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, r in enumerate(group):
                ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
                mask[row, width - len(r.prompt_ids):] = 1
            self._generate(ids, mask, max(r.output_len for r in group))
            useful += sum(r.output_len for r in group)
        return {"seconds": time.perf_counter() - start, "output_tokens": useful, "max_batch_size": self.concurrency}
