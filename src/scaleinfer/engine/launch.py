"""Starting the ranks of an engine: the executor the engine drives, and the life of a worker rank.

One process (the default): the model and a ModelRunner here, UniProcExecutor. Tensor parallel: this
process is rank 0 and either spawns the other ranks on this machine (a free port on 127.0.0.1) or
joins ranks started elsewhere, by torchrun (env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or by
hand (--distributed-init-method tcp://HOST:PORT --rank R --world-size W). Every rank then builds the
same way (`_build_rank`): communicator, its shard of the model, its KV cache sized so that every rank
holds the same number of blocks (the smallest any rank can afford).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from scaleinfer.attention.layer import set_attention_pattern
from scaleinfer.attention.patterns import parse_pattern
from scaleinfer.config import EngineConfig, ParallelConfig, torchrun_env
from scaleinfer.distributed.communicators import make_communicator
from scaleinfer.distributed.executor import Executor, MultiprocExecutor, UniProcExecutor
from scaleinfer.distributed.parallel_state import destroy_distributed, init_distributed
from scaleinfer.distributed.pipeline import LocalComm, PipelineExecutor, StageWorker, pipeline_links
from scaleinfer.distributed.sharding import plan_shard, shard_config
from scaleinfer.distributed.stages import plan_stage, stage_config
from scaleinfer.distributed.worker import Worker
from scaleinfer.engine.loading import DTYPES, build_model
from scaleinfer.errors import ConfigError, DistributedError, ScaleInferError
from scaleinfer.kv_cache.cache_tensors import num_blocks_for_budget
from scaleinfer.runner.model_runner import ModelRunner
from scaleinfer.weights.checkpoint import Checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Role:
    """Where this process joins and as which rank; `spawn`: rank 0 starts the others itself."""

    init_method: str
    rank: int
    world_size: int
    spawn: bool = False


def resolve_role(pc: ParallelConfig) -> Role | None:
    """This process's place in a distributed engine, or None for a single-process one."""
    if pc.data_parallel_size > 1:
        raise ConfigError("--data-parallel-size > 1 is not supported by one engine; serve replicas behind a router")
    env = torchrun_env()
    init = pc.distributed_init_method or ("env://" if env is not None and pc.num_ranks > 1 else None)
    if init is None:
        return Role(f"tcp://127.0.0.1:{_free_port()}", 0, pc.num_ranks, spawn=True) if pc.num_ranks > 1 else None
    if init == "env://":
        if env is None:
            raise ConfigError("--distributed-init-method env:// needs torchrun's RANK, WORLD_SIZE, MASTER_ADDR "
                              "and MASTER_PORT in the environment")
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    else:
        if pc.rank is None or pc.world_size is None:
            raise ConfigError("--distributed-init-method tcp://HOST:PORT needs --rank and --world-size")
        rank, world = pc.rank, pc.world_size
    if world != pc.num_ranks:
        raise ConfigError(f"the launcher started {world} ranks but --tensor-parallel-size x "
                          f"--pipeline-parallel-size is {pc.num_ranks}")
    return Role(init, rank, world)


def _local_ranks(role: Role) -> tuple[int, int]:
    """(this rank's index among the ranks of its host, how many ranks its host runs)."""
    if role.spawn or role.world_size == 1:
        return role.rank, role.world_size
    return int(os.environ.get("LOCAL_RANK", role.rank)), int(os.environ.get("LOCAL_WORLD_SIZE", role.world_size))


def check_device(device: str, role: Role | None) -> None:
    """A one-line error before anything starts when the GPUs asked for are not there: none visible, an
    index past the last, or fewer GPUs on this host than its ranks (NCCL runs one rank per GPU; two ranks
    of one communicator on one GPU hang or fail inside NCCL)."""
    if not device.startswith("cuda"):
        return
    suffix = device.partition(":")[2]
    if device != "cuda" and (not device.startswith("cuda:") or not suffix.isdigit()):
        raise ConfigError(f"--device {device}: write cuda or cuda:N (N a GPU index)")
    if role is not None and role.world_size > 1 and device != "cuda":
        raise ConfigError(f"--device {device} names one GPU but the engine runs {role.world_size} ranks (one GPU "
                          f"each): use --device cuda")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
    index = int(suffix or 0)
    if index >= have:
        raise ConfigError(f"--device {device}: this host has {have} GPU{'s' if have > 1 else ''} "
                          f"(cuda:0..cuda:{have - 1})")
    local = _local_ranks(role)[1] if role is not None else 1
    if local > have:
        raise ConfigError(f"{local} ranks on this host need {local} GPUs (NCCL runs one rank per GPU) but "
                          f"{have} {'is' if have == 1 else 'are'} visible: lower --tensor-parallel-size x "
                          f"--pipeline-parallel-size, or use --device cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_executor(config: EngineConfig, ckpt: Checkpoint) -> Executor:
    """The executor of an engine whose driver is this process (rank 0). On any other rank (started by
    torchrun or by hand with the same command line) this serves as a worker until rank 0 stops, then
    exits the process (SystemExit with the worker's status)."""
    role = resolve_role(config.parallel)
    check_device(config.device, role)
    if role is None:
        model = build_model(ckpt, config)
        return UniProcExecutor(_runner(config, model, ckpt.config, num_blocks=None))
    if role.rank != 0:   # the same command on every rank (torchrun): the others serve rank 0, then exit
        raise SystemExit(run_worker(config, role))
    processes = _spawn_workers(config, role) if role.spawn else []
    try:
        state, comm, runner, links = _watching(processes, lambda: _build_rank(config, ckpt, role))
    except BaseException:
        for p in processes:
            p.kill()
        raise
    logger.info("%d ranks (TP %d x PP %d, %s), communicator %s", role.world_size, state.tp_size, state.pp_size,
                "spawned here" if role.spawn else role.init_method, comm.name)
    if links is not None:
        return PipelineExecutor(runner, comm, state, links, ckpt.config.vocab_size, ckpt.config.hidden_size,
                                processes)
    return MultiprocExecutor(runner, comm, state, processes)


def _watching(processes: list, build):
    """build() (joining, loading), ended early by a DistributedError when a spawned rank exits meanwhile
    (e.g. it failed to start): no waiting out the whole timeout for a rank that is already gone."""
    if not processes:
        return build()
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = build()
        except BaseException as exc:   # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="scaleinfer-join", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.1)
        gone = [(r, p) for r, p in enumerate(processes, start=1) if p.exitcode is not None]
        if gone and thread.is_alive():
            r, p = gone[0]
            raise DistributedError(f"rank {r} (pid {p.pid}) exited with code {p.exitcode} before the engine "
                                   f"started (its error is above; a script that builds a tensor-parallel LLM "
                                   f"must do so under `if __name__ == \"__main__\":`)")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]


def _runner(config: EngineConfig, model, model_config, num_blocks: int | None) -> ModelRunner:
    if config.attention_pattern is not None:
        set_attention_pattern(model, parse_pattern(config.attention_pattern))
    dtype = DTYPES[config.dtype]
    if num_blocks is None:
        num_blocks = num_blocks_for_budget(model_config, config.cache, dtype, config.device)
    return ModelRunner(model, model_config, config.cache, num_blocks, dtype, config.device, seed=config.seed)


def _build_rank(config: EngineConfig, ckpt: Checkpoint, role: Role):
    """Join, make the communicator, load this rank's shard (of its pipeline stage), agree on the KV block
    count, build the runner: (state, communicator, runner, pipeline links or None)."""
    pc = config.parallel
    state = init_distributed(role.init_method, role.rank, role.world_size, pc.tensor_parallel_size,
                             pc.pipeline_parallel_size, pc.distributed_timeout, config.device)
    if config.device == "cuda":   # one GPU per rank of this host
        config = replace(config, device=f"cuda:{_local_ranks(role)[0]}")
    try:
        stage = (plan_stage(ckpt.config, state.pp_rank, state.pp_size, pc.pipeline_layer_partition)
                 if state.pp_size > 1 else None)
        links, comm_state = pipeline_links(state, stage, pc.steps_in_flight) if stage is not None else (None, state)
        if state.tp_size > 1 or stage is None:
            comm = make_communicator(comm_state, pc.communicator, pc.distributed_timeout, config.device)
        else:
            comm = LocalComm()
        shard = plan_shard(ckpt.config, state.tp_rank, state.tp_size) if state.tp_size > 1 or stage is None else None
        model = build_model(ckpt, config, shard=shard, comm=comm, stage=stage)
        cfg = shard_config(ckpt.config, shard) if shard is not None else ckpt.config
        cfg = stage_config(cfg, stage) if stage is not None else cfg
        blocks = torch.tensor([num_blocks_for_budget(cfg, config.cache, DTYPES[config.dtype], config.device)])
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=state.cpu_group)   # every rank: the same block ids
        return state, comm, _runner(config, model, cfg, int(blocks)), links
    except RuntimeError as exc:
        destroy_distributed()
        raise DistributedError(f"rank {role.rank}: another rank failed while the model was loading "
                               f"({str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__})") from None
    except BaseException:
        destroy_distributed()
        raise


def _spawn_workers(config: EngineConfig, role: Role) -> list:
    ctx = multiprocessing.get_context("spawn")
    processes = []
    for rank in range(1, role.world_size):
        p = ctx.Process(target=spawned_worker_main, args=(config, Role(role.init_method, rank, role.world_size)),
                        name=f"scaleinfer-rank{rank}", daemon=True)
        p.start()
        processes.append(p)
    return processes


def _die_with_parent(poll_s: float = 0.5) -> None:
    """End this process as soon as the driver that spawned it is gone (no orphans), whatever the main
    thread is doing (loading, or waiting in a collective): a daemon thread watches the parent pid."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(3)

    threading.Thread(target=watch, name="scaleinfer-parent-watch", daemon=True).start()


def spawned_worker_main(config: EngineConfig, role: Role) -> None:
    """Entry of a worker process spawned by the driver on this machine."""
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format=f"rank {role.rank} %(levelname)s %(name)s: %(message)s")
    raise SystemExit(run_worker(config, role))


def run_worker(config: EngineConfig, role: Role | None = None) -> int:
    """Serve as rank `role.rank` (default: this process's role from the config / torchrun) until the driver
    stops; the exit status. Errors are one line on the log, never a traceback."""
    from scaleinfer.weights.loader import open_checkpoint

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    role = role or resolve_role(config.parallel)
    if role is None or role.rank == 0:
        raise ConfigError("run_worker is for ranks other than 0")
    try:
        check_device(config.device, role)
        ckpt = open_checkpoint(config.model)
        state, comm, runner, links = _build_rank(config, ckpt, role)
        try:
            if links is None:
                Worker(runner, comm, role.rank).serve()
            else:
                StageWorker(runner, comm, state, links, ckpt.config.hidden_size, DTYPES[config.dtype]).serve()
        finally:
            comm.close()
            destroy_distributed()
    except ScaleInferError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
