"""EncoderEngine: embeddings, classification and scores from an encoder model (BERT / MiniLM / MPNet).

Requests are tokenized in one batch (HF `tokenizers`), checked against the model's longest input (an
error, or truncation when truncate_prompt_tokens asks for it), sorted by length and cut into batches under
the scheduler's token budget (max_num_batched_tokens, max_num_seqs) that run packed without padding
(runner/encoder_runner.py). A separate small engine: an encoder has no KV cache and no decode steps, so
it shares only the budget with the decoder scheduler, not its machinery.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from scaleinfer.engine.encoder_outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                               EmbeddingRequestOutput, ScoringOutput, ScoringRequestOutput,
                                               TokenClassificationOutput, TokenClassificationRequestOutput)
from scaleinfer.errors import ConfigError, RequestError
from scaleinfer.runner.encoder_runner import EncoderInput, EncoderRunner

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Prompt = str | Sequence[int]
_TASK_NAMES = {"embed": "an embedding", "classify": "a sequence-classification",
               "token-classify": "a token-classification"}


def resolve_encoder_path(model: str) -> str | None:
    """The HF directory of `model` if it is an encoder (catalog name or directory), else None."""
    import os

    from scaleinfer import catalog
    from scaleinfer.weights.encoder import is_encoder_dir

    if catalog.is_catalog_name(model):
        entry = catalog.get_entry(model)
        if entry.layout == "onnx":
            raise ConfigError(f"{model!r} is an ONNX file for onnxruntime ({catalog.resolve(model)}), not a model "
                              f"this engine loads; use all-minilm-l6-v2 or all-mpnet-base-v2")
        return catalog.resolve(model) if entry.layout != "gguf" and is_encoder_dir(catalog.resolve(model)) else None
    if os.path.isdir(model):
        return model if is_encoder_dir(model) else None
    from scaleinfer.weights.loader import _download, _looks_like_hub_id

    if _looks_like_hub_id(model) and not os.path.exists(model):   # e.g. distilbert-base-uncased-finetuned-sst-2-english
        path = _download(model)
        return path if is_encoder_dir(path) else None
    return None


class EncoderEngine:
    def __init__(self, path: str, *, dtype: str = "float32", device: str = "cpu", threads: int | None = None,
                 max_num_batched_tokens: int = 8192, max_num_seqs: int = 256, name: str | None = None):
        from scaleinfer.weights.encoder import load_encoder, open_encoder

        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if threads is not None:
            torch.set_num_threads(threads)
        ckpt = open_encoder(path)
        if ckpt.tokenizer is None:
            raise ConfigError(f"{path} has no tokenizer.json or vocab.txt; encoder models need their tokenizer")
        self.name = name or path
        self.source_dir = path
        self.config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.runner = EncoderRunner(load_encoder(ckpt, DTYPES[dtype], device), device)
        self._next_id = 0
        logger.info("encoder %s (%s, %s): %d layers, hidden %d, longest input %d tokens", self.name,
                    self.config.model_type, self.config.task, self.config.num_layers, self.config.hidden_size,
                    self.config.max_seq_length)

    @property
    def max_seq_length(self) -> int:
        return self.config.max_seq_length

    @property
    def embedding_size(self) -> int:
        return self.config.hidden_size

    # ---- tokenization ----------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[Prompt | tuple[str, str]], truncate_prompt_tokens: int | None = None
                 ) -> list[EncoderInput]:
        """Token ids (with the model's specials) of each prompt; a text pair becomes one [CLS] a [SEP] b [SEP]
        input. Over-long inputs raise RequestError unless truncate_prompt_tokens (-1: the model's longest)."""
        limit = self._limit(truncate_prompt_tokens)
        texts = [(i, p) for i, p in enumerate(prompts) if isinstance(p, (str, tuple))]
        out: list[EncoderInput | None] = [None] * len(prompts)
        if texts:
            encs = self.tokenizer.encode_batch([p for _, p in texts])
            for (i, _), enc in zip(texts, encs):
                out[i] = EncoderInput(list(enc.ids), list(enc.type_ids))
        for i, p in enumerate(prompts):
            if out[i] is None:
                out[i] = EncoderInput(self._check_ids(p, i))
        return [self._fit(x, i, limit, truncate_prompt_tokens is not None) for i, x in enumerate(out)]

    def _limit(self, truncate: int | None) -> int:
        if truncate is None or truncate == -1:
            return self.max_seq_length
        if isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 1:
            raise RequestError(f"truncate_prompt_tokens must be -1 (the model's longest) or a positive integer, "
                               f"got {truncate!r}")
        if truncate > self.max_seq_length:
            raise RequestError(f"truncate_prompt_tokens={truncate} exceeds the model's longest input "
                               f"{self.max_seq_length}")
        return truncate

    def _check_ids(self, ids, index: int) -> list[int]:
        if isinstance(ids, str) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError(f"input {index} must be a string or a list of token ids")
        bad = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise RequestError(f"input {index}: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return list(ids)

    def _fit(self, x: EncoderInput, index: int, limit: int, truncate: bool) -> EncoderInput:
        n = len(x.token_ids)
        if n == 0:
            raise RequestError(f"input {index} is empty; send at least one token")
        if n <= limit:
            return x
        if not truncate:
            raise RequestError(f"input {index} has {n} tokens, more than this model's {limit}; shorten it or set "
                               f"truncate_prompt_tokens=-1 (CLI: --truncate-prompt-tokens -1) to cut it to {limit}")
        keep = x.token_ids[:limit - 1] + x.token_ids[-1:]       # keep the closing [SEP] / </s>
        types = None if x.token_type_ids is None else x.token_type_ids[:limit - 1] + x.token_type_ids[-1:]
        return EncoderInput(keep, types)

    # ---- running ---------------------------------------------------------------------------
    def batches(self, inputs: list[EncoderInput]) -> list[list[int]]:
        """Indices of `inputs` grouped into batches: longest first (little padding inside attention),
        each under the token budget and max_num_seqs (a longer single input runs alone)."""
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i].token_ids))
        out, cur, tokens = [], [], 0
        for i in order:
            n = len(inputs[i].token_ids)
            if cur and (tokens + n > self.max_num_batched_tokens or len(cur) >= self.max_num_seqs):
                out.append(cur)
                cur, tokens = [], 0
            cur.append(i)
            tokens += n
        if cur:
            out.append(cur)
        return out

    def run(self, inputs: list[EncoderInput], task: str) -> list[torch.Tensor]:
        """One result per input (embed / classify: a vector; token-classify: [tokens, labels])."""
        results: list[torch.Tensor | None] = [None] * len(inputs)
        for batch in self.batches(inputs):
            out = self.runner.run([inputs[i] for i in batch], task)
            if task == "token-classify":
                rows = out.split([len(inputs[i].token_ids) for i in batch])
            else:
                rows = out.unbind(0)
            for i, row in zip(batch, rows):
                results[i] = row
        return results  # type: ignore[return-value]

    def _ids(self, n: int) -> list[str]:
        start, self._next_id = self._next_id, self._next_id + n
        return [str(start + i) for i in range(n)]

    # ---- tasks -----------------------------------------------------------------------------
    def check_dimensions(self, dimensions: int | None) -> None:
        full = self.embedding_size
        if dimensions is None or dimensions == full:
            return
        dims = self.config.pooling.matryoshka_dims
        if not dims:
            raise RequestError(f"model {self.name!r} does not support matryoshka representation; `dimensions` "
                               f"must be {full} or omitted")
        if dimensions not in dims:
            raise RequestError(f"dimensions={dimensions} is not one this model was trained for: "
                               f"{', '.join(map(str, dims[:16]))}{' ...' if len(dims) > 16 else ''}")

    def embed_tensor(self, prompts: Sequence[Prompt], truncate_prompt_tokens: int | None = None,
                     dimensions: int | None = None) -> tuple[torch.Tensor, list[EncoderInput]]:
        """[N, dims] embeddings (the model's pooling and normalization; Matryoshka-truncated and
        renormalized to `dimensions` where the model allows)."""
        self.check_dimensions(dimensions)
        inputs = self.tokenize(prompts, truncate_prompt_tokens)
        emb = torch.stack(self.run(inputs, "embed")) if inputs else torch.empty(0, self.embedding_size)
        if dimensions is not None and dimensions != self.embedding_size:
            emb = torch.nn.functional.normalize(emb[:, :dimensions], dim=-1)
        return emb, inputs

    def embed(self, prompts: Sequence[Prompt], truncate_prompt_tokens: int | None = None,
              dimensions: int | None = None) -> list[EmbeddingRequestOutput]:
        emb, inputs = self.embed_tensor(prompts, truncate_prompt_tokens, dimensions)
        return [EmbeddingRequestOutput(rid, x.token_ids, EmbeddingOutput(row.tolist()))
                for rid, x, row in zip(self._ids(len(inputs)), inputs, emb)]

    def require_task(self, task: str, what: str) -> None:
        if self.config.task != task:
            raise RequestError(f"model {self.name!r} is {_TASK_NAMES[self.config.task]} model; {what} needs a "
                               f"{'sequence' if task == 'classify' else 'token'}-classification checkpoint")

    def classify(self, prompts: Sequence[Prompt | tuple[str, str]], truncate_prompt_tokens: int | None = None
                 ) -> list[ClassificationRequestOutput]:
        self.require_task("classify", "classify")
        inputs = self.tokenize(prompts, truncate_prompt_tokens)
        out = []
        for rid, x, logits in zip(self._ids(len(inputs)), inputs, self.run(inputs, "classify")):
            probs = self.probabilities(logits)
            out.append(ClassificationRequestOutput(rid, x.token_ids, ClassificationOutput(
                probs.tolist(), self.label(int(probs.argmax())))))
        return out

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities: sigmoid for one label or multi-label models, softmax otherwise (as HF)."""
        if self.config.num_labels == 1 or self.config.problem_type == "multi_label_classification":
            return torch.sigmoid(logits)
        return torch.softmax(logits, -1)

    def label(self, index: int) -> str:
        return self.config.id2label.get(index, str(index))

    def token_classify(self, prompts: Sequence[Prompt], truncate_prompt_tokens: int | None = None
                       ) -> list[TokenClassificationRequestOutput]:
        self.require_task("token-classify", "token_classify")
        inputs = self.tokenize(prompts, truncate_prompt_tokens)
        out = []
        for rid, x, logits in zip(self._ids(len(inputs)), inputs, self.run(inputs, "token-classify")):
            probs = torch.softmax(logits, -1)
            labels = [self.config.id2label.get(int(i), str(int(i))) for i in probs.argmax(-1)]
            tokens = [self.tokenizer.id_to_token(t) or "" for t in x.token_ids]
            out.append(TokenClassificationRequestOutput(rid, x.token_ids, TokenClassificationOutput(
                tokens, labels, probs.tolist())))
        return out

    def score(self, query: Prompt | Sequence[Prompt], docs: Prompt | Sequence[Prompt],
              truncate_prompt_tokens: int | None = None) -> list[ScoringRequestOutput]:
        """One query against N docs (or N queries against N docs): a cross-encoder (one-label classifier)
        scores each pair together; an embedding model gives the cosine similarity of the two embeddings."""
        inputs, task = self.score_inputs(query, docs, truncate_prompt_tokens)
        scores, ids = self.scores(inputs, self.run(inputs, task))
        return [ScoringRequestOutput(rid, t, ScoringOutput(s)) for rid, t, s in zip(self._ids(len(scores)), ids, scores)]

    def score_inputs(self, query, docs, truncate_prompt_tokens: int | None = None
                     ) -> tuple[list[EncoderInput], str]:
        """The inputs to run for score() and their task: (query, doc) pairs for a cross-encoder, else
        the queries then the docs to embed."""
        queries, documents = _pairs(query, docs)
        if self.cross_encoder:
            return self.tokenize(list(zip(queries, documents)), truncate_prompt_tokens), "classify"
        return self.tokenize(list(queries) + list(documents), truncate_prompt_tokens), "embed"

    @property
    def cross_encoder(self) -> bool:
        return self.config.task == "classify" and self.config.num_labels == 1

    def scores(self, inputs: list[EncoderInput], rows: list[torch.Tensor]) -> tuple[list[float], list[list[int]]]:
        """(score, token ids) of each pair from score_inputs()'s rows."""
        if self.cross_encoder:
            return [float(torch.sigmoid(v[0])) for v in rows], [x.token_ids for x in inputs]
        n = len(rows) // 2
        emb = torch.stack(rows)
        scores = torch.nn.functional.cosine_similarity(emb[:n], emb[n:], dim=-1).tolist()
        return scores, [a.token_ids + b.token_ids for a, b in zip(inputs[:n], inputs[n:])]


def _pairs(query, docs) -> tuple[list, list]:
    def as_list(x):
        return [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)

    queries, documents = as_list(query), as_list(docs)
    if not documents:
        raise RequestError("score needs at least one document")
    if len(queries) == 1:
        queries = queries * len(documents)
    if len(queries) != len(documents):
        raise RequestError(f"score takes one query or as many queries as documents; got {len(queries)} and "
                           f"{len(documents)}")
    if any(isinstance(q, tuple) for q in list(queries) + list(documents)):
        raise RequestError("score takes texts or token ids, not pairs")
    return queries, documents



