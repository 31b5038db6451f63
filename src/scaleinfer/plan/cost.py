"""One layout's estimate: memory per device, the largest batch at a context, decode latency and throughput,
prefill throughput and time to first token, communication per token. Roofline arithmetic:

  a step's stage time   max(bytes read / (bandwidth x bw_efficiency), FLOPs / (FLOP/s x mfu)) + TP comm
  TP comm               2 all-reduces per layer of batch x hidden activations (+ 1 for the vocab-parallel
                        embedding, + a gather of the logits), alpha-beta: alpha ceil(log2 t) + 2(t-1)/t n / beta
  PP                    stages of ceil(layers/pp) layers; decode keeps pp micro-batches in flight (vLLM's
                        virtual engines), so a token waits pp stage times; a send is alpha + n / beta
  DP                    independent replicas: throughput x dp, latency unchanged

Bytes read per decode step: every weight of the stage once (MoE: the experts the batch routes to) + the KV
of every sequence at the given context. KV heads split across TP ranks, replicated when fewer than ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scaleinfer.plan.devices import Cluster, Link
from scaleinfer.plan.shapes import ACTIVATION_BYTES, ModelShape, WeightFormat, kv_bytes_per_token


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp{self.tp} pp{self.pp} dp{self.dp}"


@dataclass(frozen=True)
class Workload:
    context: int
    """Tokens per sequence the KV cache must hold (and decode reads)."""
    weights: WeightFormat
    kv_format: str
    act_dtype: str
    """Activation dtype: what TP / PP send and workspaces hold."""
    compute_dtype: str
    """The dtype of the FLOP/s the matmuls run at (device.flops key)."""
    batch: int | None = None
    """Sequences per replica; None: the largest that fits (at most max_batch) within the latency bound."""
    max_batch: int = 256
    """vLLM's default max_num_seqs."""
    chunk: int = 2048
    """Prefill tokens per step (max_num_batched_tokens): sizes the workspace and the prefill chunks."""
    bw_efficiency: float = 0.8
    mfu: float = 0.5
    max_tpot: float | None = None
    """Seconds per output token the chosen batch may take (None: no bound)."""


@dataclass
class Estimate:
    layout: Layout
    fits: bool
    why_not: str
    weights_bytes: float
    """Per device (the largest stage: first or last holds the embedding / LM head)."""
    kv_bytes_per_token: float
    """Per device, one token of one sequence."""
    workspace_bytes: float
    free_bytes: float
    """What is left for KV after weights, workspace and the runtime's reserve."""
    max_batch: int
    """Sequences per replica at the context."""
    batch: int
    kv_bytes: float
    """Per device at context x batch."""
    read_bytes_b1: float
    """Bytes one device reads in a batch-1 decode step (the heaviest stage)."""
    latency_b1: float
    """Seconds per output token at batch 1."""
    tpot: float
    decode_tokens_s: float
    prefill_tokens_s: float
    ttft: float
    """Seconds to prefill one prompt of `context` tokens on an idle replica."""
    comm_bytes_per_token: float
    """Bytes one device sends per decode step of one sequence (TP collectives + PP sends)."""
    comm_s_per_step: float
    """Communication seconds in one decode step at batch 1 (all stages)."""
    decode_bubble: float


def allreduce_s(nbytes: float, ranks: int, link: Link) -> float:
    """alpha x ceil(log2 t) (tree / recursive doubling: what NCCL and gloo do for the small messages of decode)
    + the ring's bandwidth term 2(t-1)/t x n / beta (each rank sends that share of the buffer)."""
    if ranks == 1:
        return 0.0
    return math.ceil(math.log2(ranks)) * link.latency_s + 2 * (ranks - 1) / ranks * nbytes / link.bandwidth


def gather_s(nbytes: float, ranks: int, link: Link) -> float:
    if ranks == 1:
        return 0.0
    return math.ceil(math.log2(ranks)) * link.latency_s + (ranks - 1) / ranks * nbytes / link.bandwidth


class _Stage:
    """The per-device numbers of one pipeline stage of a layout (the heaviest one)."""

    def __init__(self, shape: ModelShape, layout: Layout, work: Workload):
        t = layout.tp
        self.shape, self.t, self.work = shape, t, work
        self.layers = math.ceil(shape.num_layers / layout.pp)
        self.kv_heads = math.ceil(shape.num_kv_heads / t)   # replicated when fewer KV heads than ranks
        q = shape.hidden_size * shape.num_heads * shape.head_dim
        self.attn = 2 * q / t + 2 * shape.hidden_size * self.kv_heads * shape.head_dim
        self.vocab_rows = shape.embedding_params() / t       # the embedding's or the LM head's share
        self.act = ACTIVATION_BYTES[work.act_dtype]
        self.kv_token = kv_bytes_per_token(shape, work.kv_format, self.layers, self.kv_heads)
        self.weights = self.layers * (self.attn + shape.mlp_params() / t) * work.weights.body \
            + self._ends(shape, layout.pp)

    def _ends(self, shape: ModelShape, pp: int) -> float:
        """Embedding (first stage) and LM head (last stage) bytes. The embedding table stays in the model's
        dtype under every weight format (as this engine and vLLM keep it); a tied head is a second copy
        when the head's format differs from the embedding's (this engine's int8 head on CPU)."""
        embed_bytes, head_bytes = ACTIVATION_BYTES[self.work.act_dtype], self.work.weights.head
        first = self.vocab_rows * embed_bytes
        separate = not shape.tie_word_embeddings or head_bytes != embed_bytes
        last = self.vocab_rows * head_bytes if separate else 0.0
        return first + last if pp == 1 else max(first, last)

    def mlp_read(self, tokens: int) -> float:
        return self.shape.mlp_params(self.shape.active_experts(tokens)) / self.t

    def step_s(self, batch: float, cluster: Cluster, context: int) -> float:
        """One decode step of `batch` sequences through this stage: roofline + TP collectives."""
        work, dev = self.work, cluster.device
        read = self.read_bytes(batch, context)
        heads = self.shape.num_heads / self.t
        flops = 2 * batch * (self.layers * (self.attn + self.mlp_active()) + self.vocab_rows) \
            + 4 * batch * context * self.layers * heads * self.shape.head_dim
        roof = max(read / (dev.bandwidth * work.bw_efficiency), flops / (dev.flops[work.compute_dtype] * work.mfu))
        return roof + self.tp_comm_s(batch, cluster)

    def read_bytes(self, batch: float, context: int) -> float:
        """Bytes a decode step of `batch` sequences reads on this stage's device: weights once, KV per sequence."""
        linear = self.layers * (self.attn + self.mlp_read(math.ceil(batch)))
        return linear * self.work.weights.body + self.vocab_rows * self.work.weights.head \
            + batch * context * self.kv_token

    def mlp_active(self) -> float:
        return self.shape.mlp_params(self.shape.experts_per_token) / self.t

    def tp_comm_s(self, tokens: float, cluster: Cluster, logit_rows: float | None = None) -> float:
        """TP collectives of one step of `tokens` tokens (`logit_rows` of them sampled: all by default)."""
        link = cluster.link_for(self.t)
        hidden = tokens * self.shape.hidden_size * self.act
        logits = (tokens if logit_rows is None else logit_rows) * self.shape.vocab_size * 4
        return (2 * self.layers + 1) * allreduce_s(hidden, self.t, link) + gather_s(logits, self.t, link)

    def tp_bytes_per_token(self) -> float:
        if self.t == 1:
            return 0.0
        share = (self.t - 1) / self.t
        return (2 * self.layers + 1) * 2 * share * self.shape.hidden_size * self.act + share * self.shape.vocab_size * 4

    def workspace(self, batch: int) -> float:
        """Activation buffers of one prefill chunk (in and out of each matmul) + the fp32 logits of a step."""
        s, t = self.shape, self.t
        per_token = 2 * s.hidden_size + (s.num_heads / t + 2 * self.kv_heads) * s.head_dim \
            + 2 * s.intermediate_size * s.experts_per_token / t
        return 2 * self.work.chunk * per_token * self.act + batch * s.vocab_size / t * 4

    def prefill_chunk_s(self, tokens: int, context: int, cluster: Cluster) -> float:
        """One chunk of a prompt of `context` tokens through this stage (causal: half the context on average)."""
        work, dev = self.work, cluster.device
        heads = self.shape.num_heads / self.t
        flops = 2 * tokens * self.layers * (self.attn + self.mlp_active()) \
            + 2 * tokens * context * self.layers * heads * self.shape.head_dim
        read = self.weights + tokens * self.kv_token
        roof = max(read / (dev.bandwidth * work.bw_efficiency), flops / (dev.flops[work.compute_dtype] * work.mfu))
        return roof + self.tp_comm_s(tokens, cluster, logit_rows=1)


def estimate(shape: ModelShape, cluster: Cluster, layout: Layout, work: Workload) -> Estimate:
    """The numbers of one layout; `fits` False (with the reason) when it cannot run the workload."""
    stage, dev, pp = _Stage(shape, layout, work), cluster.device, layout.pp
    pp_link = cluster.link_for(layout.tp * pp)
    workspace = stage.workspace(work.batch or work.max_batch)
    free = dev.memory * dev.memory_fraction - dev.reserved - stage.weights - workspace
    max_batch = max(0, int(min(free // (stage.kv_token * work.context), work.max_batch)))

    def send_s(tokens: float) -> float:
        return 0.0 if pp == 1 else pp_link.latency_s + tokens * shape.hidden_size * stage.act / pp_link.bandwidth

    def tpot(batch: int) -> float:
        micro_batches = min(batch, pp)
        micro = batch / micro_batches
        return max(micro_batches, pp) * stage.step_s(micro, cluster, work.context) + (pp - 1) * send_s(micro)

    why = _why_not(shape, layout, work, max_batch, free, stage.kv_token)
    batch = work.batch or _largest_batch(max(max_batch, 1), tpot, work.max_tpot)
    chunk = min(work.chunk, work.context)
    chunk_s = stage.prefill_chunk_s(chunk, work.context, cluster)
    chunks = math.ceil(work.context / chunk)
    comm_b1 = pp * stage.tp_comm_s(1, cluster) + (pp - 1) * send_s(1)
    return Estimate(
        layout=layout, fits=not why, why_not=why, weights_bytes=stage.weights, kv_bytes_per_token=stage.kv_token,
        workspace_bytes=workspace, free_bytes=free, max_batch=max_batch, batch=batch,
        kv_bytes=batch * work.context * stage.kv_token, read_bytes_b1=stage.read_bytes(1, work.context),
        latency_b1=tpot(1), tpot=tpot(batch),
        decode_tokens_s=layout.dp * batch / tpot(batch),
        prefill_tokens_s=layout.dp * chunk / max(chunk_s, send_s(chunk)),
        ttft=(chunks + pp - 1) * chunk_s + (pp - 1) * send_s(chunk),
        comm_bytes_per_token=stage.tp_bytes_per_token() + (pp > 1) * shape.hidden_size * stage.act,
        comm_s_per_step=comm_b1, decode_bubble=max(0.0, 1 - batch / pp))


def _why_not(shape: ModelShape, layout: Layout, work: Workload, max_batch: int, free: float,
             kv_token: float) -> str:
    if shape.num_heads % layout.tp:
        return f"tp={layout.tp} does not divide the {shape.num_heads} attention heads"
    if layout.pp > shape.num_layers:
        return f"pp={layout.pp} exceeds the {shape.num_layers} layers"
    if max_batch < 1:
        need = kv_token * work.context
        return (f"out of memory: {-free / 1e9 if free < 0 else 0:.1f} GB short for weights and workspace" if free < 0
                else f"out of memory: one sequence of {work.context} tokens needs {need / 1e9:.2f} GB of KV, "
                     f"{free / 1e9:.2f} GB left")
    if work.batch and work.batch > max_batch:
        return f"batch {work.batch} does not fit at context {work.context} (largest: {max_batch})"
    return ""


def _largest_batch(limit: int, tpot, bound: float | None) -> int:
    """The largest batch <= limit whose TPOT is within the bound (tpot grows with the batch): bisection."""
    if bound is None or tpot(limit) <= bound:
        return limit
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if tpot(mid) <= bound else (low, mid - 1)
    return low
