"""The plan as text (a header, one table row per layout, the recommendation) and as JSON-ready data."""
from __future__ import annotations

import dataclasses

from scaleinfer.plan.cost import Estimate
from scaleinfer.plan.search import Plan
from scaleinfer.plan.shapes import kv_bytes_per_token

OBJECTIVE = ("highest decode tokens/s over all replicas at the largest batch whose TPOT is within the bound; "
             "ties: lower TPOT, fewer stages")
_COLUMNS = [("layout", 12), ("fits", 4), ("weights", 9), ("KV/token", 9), ("max bs", 6), ("bs", 5),
            ("KV", 9), ("b1 read", 9), ("b1 ms/tok", 9), ("TPOT ms", 8), ("decode tok/s", 12), ("prefill tok/s", 13),
            ("TTFT ms", 9), ("comm/tok", 9), ("comm ms", 8)]


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def _row(e: Estimate) -> list[str]:
    if not e.fits and e.max_batch < 1:
        return [str(e.layout), "no", _bytes(e.weights_bytes), _bytes(e.kv_bytes_per_token)] + ["-"] * 11
    return [str(e.layout), "yes" if e.fits else "no", _bytes(e.weights_bytes), _bytes(e.kv_bytes_per_token),
            str(e.max_batch), str(e.batch), _bytes(e.kv_bytes), _bytes(e.read_bytes_b1),
            f"{e.latency_b1 * 1e3:.2f}", f"{e.tpot * 1e3:.2f}",
            f"{e.decode_tokens_s:,.0f}", f"{e.prefill_tokens_s:,.0f}", f"{e.ttft * 1e3:,.0f}",
            _bytes(e.comm_bytes_per_token), f"{e.comm_s_per_step * 1e3:.3f}"]


def header(p: Plan) -> list[str]:
    s, d, w = p.shape, p.cluster.device, p.work
    kv = kv_bytes_per_token(s, w.kv_format)
    flops = d.flops[w.compute_dtype] / 1e12
    bound = "none" if w.max_tpot is None else f"{w.max_tpot * 1e3:g} ms"
    moe = f", MoE {s.num_experts} experts top-{s.experts_per_token}" if s.num_experts > 1 else ""
    return [
        f"model    {s.name}: {s.total_params() / 1e9:.2f}B params{moe}, {s.num_layers} layers, {s.num_heads} heads / "
        f"{s.num_kv_heads} KV heads x {s.head_dim}; weights {w.weights.name}, KV {w.kv_format} "
        f"{_bytes(kv)}/token (2 x layers x kv_heads x head_dim x bytes)",
        f"devices  {p.cluster.count} x {d.name}: {_bytes(d.memory)} ({d.memory_fraction:.0%} usable, "
        f"{_bytes(d.reserved)} reserved), {d.bandwidth / 1e9:g} GB/s, {flops:g} TFLOP/s {w.compute_dtype}; "
        f"link {d.link.name} ({d.link.latency_s * 1e6:g} us, {d.link.bandwidth / 1e9:g} GB/s), {d.per_node}/node, "
        f"then {d.inter_link.name}",
        f"workload context {w.context}, batch {w.batch or f'auto (<= {w.max_batch})'}, TPOT bound {bound}, "
        f"bandwidth efficiency {w.bw_efficiency:g}, MFU {w.mfu:g}, prefill chunk {w.chunk}, "
        f"activations {w.act_dtype}",
    ]


def format_plan(p: Plan) -> str:
    lines = header(p) + [""]
    lines.append("  ".join(f"{name:>{width}}" for name, width in _COLUMNS))
    for e in p.estimates:
        lines.append("  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(_row(e), _COLUMNS)))
    lines.append("")
    lines += [f"not fitting: {e.layout}: {e.why_not}" for e in p.estimates if not e.fits]
    lines.append(f"objective: {OBJECTIVE}")
    lines.append(recommendation(p))
    return "\n".join(lines)


def recommendation(p: Plan) -> str:
    if p.best is None:
        return ("recommended: none: no layout fits; use more or larger devices, a lower --context, or "
                "--quantization fp8/int8/awq")
    e = p.best
    text = (f"recommended: {e.layout} (batch {e.batch} per replica: {e.decode_tokens_s:,.0f} decode tok/s, "
            f"TPOT {e.tpot * 1e3:.2f} ms, batch-1 {e.latency_b1 * 1e3:.2f} ms/token)")
    return text if p.meets_bound else text + "; no layout meets the TPOT bound, so this is the lowest latency"


def to_json(p: Plan) -> dict:
    w = p.work
    return {
        "model": dataclasses.asdict(p.shape) | {"params": p.shape.total_params()},
        "devices": {"spec": p.cluster.spec, "count": p.cluster.count, **dataclasses.asdict(p.cluster.device)},
        "workload": dataclasses.asdict(w) | {"weights": w.weights.name},
        "objective": OBJECTIVE,
        "layouts": [_estimate_json(e) for e in p.estimates],
        "recommended": None if p.best is None else str(p.best.layout),
        "meets_tpot_bound": p.meets_bound,
    }


def _estimate_json(e: Estimate) -> dict:
    out = dataclasses.asdict(e)
    out["layout"] = {"tp": e.layout.tp, "pp": e.layout.pp, "dp": e.layout.dp}
    return out
