"""LLM: the offline facade with vLLM-compatible signatures (generate, chat, stream)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from tqdm import tqdm

from scaleinfer.config import (DEFAULT_MODEL, CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig,
                               parse_memory)
from scaleinfer.config import speculative_config as make_speculative_config
from scaleinfer.engine.encoder_outputs import (ClassificationRequestOutput, EmbeddingRequestOutput,
                                               ScoringRequestOutput, TokenClassificationRequestOutput)
from scaleinfer.engine.engine import LLMEngine
from scaleinfer.request import BeamSearchOutput, BeamSearchSequence, RequestOutput
from scaleinfer.sampling_params import BeamSearchParams, SamplingParams

Message = dict[str, str]


class LLM:
    """Load a model and generate from it.

        llm = LLM("smollm2-135m-instruct")
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
        print(out[0].outputs[0].text)
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = EngineConfig.dtype,
        device: str = EngineConfig.device,
        max_model_len: int = SchedulerConfig.max_model_len,
        kv_cache_memory: int | str = CacheConfig.kv_cache_memory,
        block_size: int = CacheConfig.block_size,
        max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
        max_num_seqs: int = SchedulerConfig.max_num_seqs,
        enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
        threads: int | None = EngineConfig.threads,
        seed: int = EngineConfig.seed,
        quantization: str = EngineConfig.quantization,
        kv_cache_dtype: str = CacheConfig.kv_cache_dtype,
        attention_pattern: str | None = EngineConfig.attention_pattern,
        calibration: str | None = EngineConfig.calibration,
        tensor_parallel_size: int = ParallelConfig.tensor_parallel_size,
        pipeline_parallel_size: int = ParallelConfig.pipeline_parallel_size,
        data_parallel_size: int = ParallelConfig.data_parallel_size,
        distributed_init_method: str | None = ParallelConfig.distributed_init_method,
        distributed_timeout: float = ParallelConfig.distributed_timeout,
        distributed_communicator: str = ParallelConfig.communicator,
        parallel: ParallelConfig | None = None,
        speculative_model: str | None = None,
        num_speculative_tokens: int | None = None,
        speculative_method: str | None = None,
        speculative_config: dict | SpeculativeConfig | None = None,
    ):
        """Every default is the config dataclasses' own (config.py); a memory size may be a string
        such as "512MiB". `parallel` (a whole ParallelConfig) overrides the separate distributed arguments.
        data_parallel_size=N runs N engine processes here (each may itself be tensor/pipeline parallel),
        the threads split between them; generate() and chat() spread their prompts over them
        (engine/data_parallel.py). Speculative decoding (vLLM's names): speculative_method "ngram" or
        "draft" with speculative_model, num_speculative_tokens (k), or a whole speculative_config dict."""
        parallel = parallel or ParallelConfig(
            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            data_parallel_size=data_parallel_size, distributed_init_method=distributed_init_method,
            distributed_timeout=distributed_timeout, communicator=distributed_communicator)
        config = EngineConfig(
            model=model, dtype=dtype, device=device, threads=threads, seed=seed, quantization=quantization,
            attention_pattern=attention_pattern, calibration=calibration,
            cache=CacheConfig(block_size=block_size, kv_cache_memory=parse_memory(kv_cache_memory),
                              enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      max_model_len=max_model_len),
            parallel=parallel,
            speculative=make_speculative_config(speculative_method, speculative_model, num_speculative_tokens,
                                                speculative_config),
        )
        self._dp = None
        self.encoder = _encoder_engine(model, dtype, device, threads, max_num_batched_tokens, max_num_seqs)
        if self.encoder is not None:   # BERT / MiniLM / MPNet: embed, classify, score (engine/encoder_engine.py)
            self.engine = None  # type: ignore[assignment]
            self.tokenizer = self.encoder.tokenizer
            return
        if parallel.data_parallel_size != 1:
            from dataclasses import replace

            from scaleinfer.engine.data_parallel import DataParallelEngines
            from scaleinfer.weights.loader import open_checkpoint

            self.tokenizer = open_checkpoint(model).tokenizer
            one = replace(config, parallel=replace(parallel, data_parallel_size=1))   # each process: one replica
            self._dp = DataParallelEngines(one, parallel.data_parallel_size)
            self.engine = None  # type: ignore[assignment]  (N engines, in their processes)
            return
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    # ---- encoder models (vLLM's pooling API) --------------------------------------------------
    def embed(self, prompts, *, truncate_prompt_tokens: int | None = None, dimensions: int | None = None,
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """Sentence embeddings (the model's pooling and normalization): out[i].outputs.embedding."""
        return self._pooling("embed").embed(_as_list(prompts), truncate_prompt_tokens, dimensions)

    def classify(self, prompts, *, truncate_prompt_tokens: int | None = None,
                 use_tqdm: bool = False) -> list[ClassificationRequestOutput]:
        """Class probabilities of a sequence-classification model: out[i].outputs.probs."""
        return self._pooling("classify").classify(_as_list(prompts), truncate_prompt_tokens)

    def token_classify(self, prompts, *, truncate_prompt_tokens: int | None = None
                       ) -> list[TokenClassificationRequestOutput]:
        """Per-token labels and probabilities of a token-classification (NER) model."""
        return self._pooling("token_classify").token_classify(_as_list(prompts), truncate_prompt_tokens)

    def score(self, text_1, text_2, *, truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = False) -> list[ScoringRequestOutput]:
        """Similarity of text_1 (one, or one per text_2) to each text_2: out[i].outputs.score."""
        return self._pooling("score").score(text_1, text_2, truncate_prompt_tokens)

    def _pooling(self, what: str):
        if self.encoder is None:
            from scaleinfer.errors import ConfigError

            raise ConfigError(f"{what}() needs an encoder model (e.g. all-minilm-l6-v2); this LLM holds a "
                              f"generate model: use generate() or chat()")
        return self.encoder

    def shutdown(self) -> None:
        """Stop the engine processes of data_parallel_size > 1 (they also end with this interpreter)."""
        if self._dp is not None:
            self._dp.close()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run all prompts to completion with continuous batching; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            from scaleinfer.errors import RequestError

            raise RequestError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        if self._dp is not None:
            return self._dp.generate(list(prompts), params_list)
        self._need_generate("generate")
        ids = []
        for prompt, p in zip(prompts, params_list):
            request_id = self.engine.new_request_id()
            self.engine.add_request(request_id, prompt, p)
            ids.append(request_id)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]

    def beam_search(self, prompts: Sequence[str | list[int] | dict], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search API: each prompt (text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...})
        -> its beam_width sequences, best first (prompt included in tokens and text, as vLLM returns them)."""
        plain = [p.get("prompt_token_ids", p.get("prompt")) if isinstance(p, dict) else p for p in prompts]
        results = []
        for out in self.generate(plain, params.to_sampling_params(), use_tqdm):
            seqs = [BeamSearchSequence(out.prompt_token_ids + o.token_ids, o.cumulative_logprob or 0.0,
                                       (out.prompt or self.tokenizer.decode(out.prompt_token_ids)) + o.text,
                                       o.finish_reason, o.stop_reason) for o in out.outputs]
            results.append(BeamSearchOutput(seqs))
        return results

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one or several conversations and generate replies."""
        self._need_generate("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.render_chat(c, add_generation_prompt) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _need_generate(self, what: str) -> None:
        if self.encoder is not None:
            from scaleinfer.errors import ConfigError

            raise ConfigError(f"{what}() needs a generate model; {self.encoder.name!r} is an encoder: use embed(), "
                              f"classify() or score()")

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def transcribe(self, audio, language: str | None = None, task: str = "transcribe", *,
                   sample_rate: int | None = None, options=None, beam_size: int | None = None,
                   patience: float | None = None, length_penalty: float | None = None):
        """Transcribe (or, task="translate", translate to English) speech with a Whisper model: `audio` is a
        file path, a file's bytes, or a float / int16 sample array (with its `sample_rate`); a list of them
        runs together, their windows batched. Returns a speech.transcribe.Transcription (text, language,
        segments with timestamps), or a list for a list. `options`: a full TranscriptionOptions; beam_size,
        patience, length_penalty (when given) override its beam search at temperature 0 (default: greedy)."""
        from dataclasses import replace

        from scaleinfer.speech.drivers import prepare, run_offline
        from scaleinfer.speech.transcribe import TranscriptionOptions

        if self._dp is not None:
            from scaleinfer.errors import ConfigError

            raise ConfigError("transcribe() runs on one engine; use an LLM with data_parallel_size=1")
        opts = replace(options or TranscriptionOptions(), language=language or (options and options.language),
                       task=task if options is None else options.task)
        beam = {k: v for k, v in (("beam_size", beam_size), ("patience", patience),
                                  ("length_penalty", length_penalty)) if v is not None}
        opts = replace(opts, **beam) if beam else opts
        many = isinstance(audio, list)
        gens = [prepare(a, opts, self.tokenizer, self.engine.model_config, self.engine.max_model_len, sample_rate)
                for a in (audio if many else [audio])]
        results = run_offline(self.engine, gens)
        return results if many else results[0]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Yield the request's cumulative output after every step that changed it (the last is finished).

        Breaking out of the loop aborts the request.
        """
        self._need_generate("stream")
        if self._dp is not None:
            from scaleinfer.errors import ConfigError

            raise ConfigError("stream() runs one request on one engine; use an LLM with data_parallel_size=1")
        request_id = self.engine.new_request_id()
        self.engine.add_request(request_id, prompt, sampling_params or SamplingParams())
        done = False
        try:
            while not done and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == request_id:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort_request(request_id)


def _as_list(prompts) -> list:
    """One prompt (a text or a list of token ids) or many -> a list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _encoder_engine(model: str, dtype: str, device: str, threads: int | None, max_num_batched_tokens: int,
                    max_num_seqs: int):
    """An EncoderEngine when `model` is an encoder (BERT family), else None (a generate model)."""
    from scaleinfer.engine.encoder_engine import EncoderEngine, resolve_encoder_path

    path = resolve_encoder_path(model)
    if path is None:
        return None
    return EncoderEngine(path, dtype=dtype, device=device, threads=threads, name=model,
                         max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
