"""Devices and links for the planner: a table of accelerators and CPUs (memory, bandwidth, dense FLOP/s per
dtype, interconnect) and the `--devices` spelling: `[N x]NAME[:key=value,...]`, e.g. `8xH100`,
`2xH200`, `cpu`, `cpu:ranks=2` (one host split into 2 ranks sharing its cores and bandwidth),
`cpu:cores=16,bw=200,mem=128`, `16xH100` (two nodes of 8: groups that span nodes use the inter-node link).

GPU numbers are the vendors' datasheet values (dense, no sparsity); the `cpu` entry is this machine, a
2-core VM, measured (see the README's plan section for the commands). Link costs are alpha (latency per
message) and beta (bytes/s per device and direction); what is an assumption rather than a measurement is
marked so below.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from scaleinfer.errors import ConfigError


@dataclass(frozen=True)
class Link:
    name: str
    latency_s: float
    """alpha: the time of one small message or of a 2-rank all-reduce of a few KB (a collective over t
    ranks takes ceil(log2 t) of them)."""
    bandwidth: float
    """beta: bytes/s each device sends (one direction)."""


@dataclass(frozen=True)
class Device:
    name: str
    memory: float
    """Bytes of device memory (a CPU: the RAM the engine may use)."""
    bandwidth: float
    """Bytes/s of memory bandwidth (HBM / DRAM streaming)."""
    flops: dict
    """Dense FLOP/s (OPS for int8) per compute dtype: "fp32", "bf16", "fp16", "fp8", "int8"."""
    link: Link
    """Between devices of one node."""
    per_node: int
    """Devices one node holds (groups larger than this cross the inter-node link)."""
    inter_link: Link
    reserved: float = 0.0
    """Bytes the runtime keeps for itself (CUDA context, graphs, allocator slack)."""
    memory_fraction: float = 0.9
    """Share of memory the engine may fill (vLLM's gpu_memory_utilization)."""
    default_dtype: str = "bf16"


NVLINK4 = Link("NVLink4", 8e-6, 450e9)            # 900 GB/s bidirectional; alpha assumed (NCCL small messages)
NVLINK3 = Link("NVLink3", 8e-6, 300e9)            # 600 GB/s bidirectional; alpha assumed
PCIE4 = Link("PCIe4", 15e-6, 25e9)                # x16: 32 GB/s per direction, ~25 usable; alpha assumed
IB_NDR = Link("InfiniBand-400G", 20e-6, 50e9)     # 400 Gb/s per GPU; alpha assumed (inter-node NCCL)
ETHERNET = Link("Ethernet-10G", 150e-6, 1.25e9)   # alpha assumed (gloo over TCP between hosts)
GLOO_LOCAL = Link("gloo-localhost", 112e-6, 0.8e9)  # measured here, 2 ranks: 576 floats 112 us, 4 MiB 5.2 ms
SHM_LOCAL = Link("shm-localhost", 5e-6, 10e9)     # assumed (a shared-memory all-reduce); measure and replace


def _gpu(name, memory_gb, bw_tb_s, bf16_tflops, fp8_tflops, fp32_tflops, link, **kw) -> Device:
    flops = {"bf16": bf16_tflops * 1e12, "fp16": bf16_tflops * 1e12, "fp8": fp8_tflops * 1e12,
             "int8": fp8_tflops * 1e12, "fp32": fp32_tflops * 1e12}
    return Device(name, memory_gb * 1e9, bw_tb_s * 1e12, flops, link, 8, IB_NDR, reserved=1.5e9, **kw)


# The 2-core VM this project is developed on: ~22 GB/s streaming (torch.sum over 2 GiB, 2 threads),
# fp32 GEMM and int8 rates measured with torch / our w4a8 GEMM on 2 threads (README, plan section).
CPU_CORES = 2
CPU_BANDWIDTH = 22e9
CPU_FLOPS_PER_CORE = {"fp32": 186e9, "bf16": 1178e9, "fp16": 186e9, "int8": 1162e9, "fp8": 186e9}
"""torch GEMM 2048^3 on 2 threads, best of 5: fp32 372, bf16 2357 (AMX), int8 (torch._int_mm) 2324 GFLOP/s."""
CPU_MEMORY = 20e9

DEVICES = {d.name.lower(): d for d in (
    _gpu("H100-80GB-SXM", 80, 3.35, 989, 1979, 67, NVLINK4),
    _gpu("H200", 141, 4.8, 989, 1979, 67, NVLINK4),
    _gpu("A100-80GB", 80, 2.039, 312, 624, 19.5, NVLINK3),
    _gpu("L4", 24, 0.3, 121, 242, 30, PCIE4),
)}
ALIASES = {"h100": "h100-80gb-sxm", "h100-sxm": "h100-80gb-sxm", "h100-80gb": "h100-80gb-sxm",
           "h200-141gb": "h200", "a100": "a100-80gb", "l4-24gb": "l4"}
LINKS = {"nvlink": NVLINK4, "pcie": PCIE4, "infiniband": IB_NDR, "ethernet": ETHERNET, "gloo": GLOO_LOCAL,
         "shm": SHM_LOCAL}


def cpu_device(cores: float = CPU_CORES, bandwidth: float = CPU_BANDWIDTH, memory: float = CPU_MEMORY,
               link: Link = GLOO_LOCAL) -> Device:
    """A CPU host (or one rank of it): FLOP/s scale with cores at this VM's measured per-core rate."""
    flops = {k: v * cores for k, v in CPU_FLOPS_PER_CORE.items()}
    return Device(f"cpu({cores:g} cores, {bandwidth / 1e9:g} GB/s)", memory, bandwidth, flops, link, 1, ETHERNET,
                  memory_fraction=1.0, default_dtype="fp32")


@dataclass(frozen=True)
class Cluster:
    device: Device
    count: int
    spec: str
    """The --devices text it came from."""

    def link_for(self, group: int) -> Link:
        """The link a group of `group` consecutive devices talks over."""
        return self.device.link if group <= self.device.per_node else self.device.inter_link


def parse_devices(spec: str) -> Cluster:
    """`[N x]NAME[:key=value,...]` -> Cluster; a one-line ConfigError naming the known devices otherwise."""
    count_text, sep, rest = spec.strip().lower().partition("x")
    if not (sep and count_text.isdigit()):
        count_text, rest = "1", spec.strip().lower()
    name, _, options_text = rest.partition(":")
    options = _options(options_text, spec)
    count = int(count_text)
    if count < 1:
        raise ConfigError(f"--devices {spec!r}: the device count must be at least 1")
    if name == "cpu":
        return _cpu_cluster(count, options, spec)
    device = DEVICES.get(ALIASES.get(name, name))
    if device is None:
        known = ", ".join(sorted([d.name for d in DEVICES.values()] + ["cpu"]))
        raise ConfigError(f"--devices {spec!r}: unknown device {name!r}; known: {known} (e.g. 8xH100, cpu:ranks=2)")
    return Cluster(_override(device, options, spec), count, spec)


def _options(text: str, spec: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--devices {spec!r}: option {item!r} is not key=value")
        options[key.strip()] = value.strip()
    return options


def _number(options: dict, key: str, spec: str, default: float) -> float:
    if key not in options:
        return default
    try:
        value = float(options.pop(key))
    except ValueError:
        raise ConfigError(f"--devices {spec!r}: {key} must be a number") from None
    if value <= 0:
        raise ConfigError(f"--devices {spec!r}: {key} must be positive")
    return value


def _link(options: dict, spec: str, default: Link) -> Link:
    name = options.pop("link", None)
    if name is None:
        return default
    if name not in LINKS:
        raise ConfigError(f"--devices {spec!r}: unknown link {name!r}; known: {', '.join(LINKS)}")
    return LINKS[name]


def _cpu_cluster(count: int, options: dict, spec: str) -> Cluster:
    """`Ncpu` is N hosts on Ethernet; `cpu:ranks=R` splits one host into R ranks sharing its cores and
    bandwidth (what `--tensor-parallel-size R` does on one machine)."""
    cores = _number(options, "cores", spec, CPU_CORES)
    bandwidth = _number(options, "bw", spec, CPU_BANDWIDTH / 1e9) * 1e9
    memory = _number(options, "mem", spec, CPU_MEMORY / 1e9) * 1e9
    ranks = int(_number(options, "ranks", spec, 1))
    link = _link(options, spec, GLOO_LOCAL)
    _no_leftovers(options, spec)
    rank = cpu_device(cores / ranks, bandwidth / ranks, memory / ranks, link)
    if ranks > 1:
        rank = dataclasses.replace(rank, per_node=ranks, name=f"cpu rank ({cores / ranks:g} of {cores:g} cores, "
                                                           f"{bandwidth / ranks / 1e9:g} GB/s)")
    return Cluster(rank, count * ranks, spec)


def _override(device: Device, options: dict, spec: str) -> Device:
    memory = _number(options, "mem", spec, device.memory / 1e9) * 1e9
    bandwidth = _number(options, "bw", spec, device.bandwidth / 1e9) * 1e9
    per_node = int(_number(options, "per_node", spec, device.per_node))
    link = _link(options, spec, device.link)
    _no_leftovers(options, spec)
    return dataclasses.replace(device, memory=memory, bandwidth=bandwidth, per_node=per_node, link=link)


def _no_leftovers(options: dict, spec: str) -> None:
    if options:
        raise ConfigError(f"--devices {spec!r}: unknown option(s) {', '.join(options)}; "
                          f"known: mem, bw, cores (cpu), ranks (cpu), per_node, link")
