"""`scaleinfer bench prune`: one table of pruning targets (and distilled students): parameters, perplexity on
the EN and ZH texts, prefill (pp512) and batch-1 decode (tg128) speed, against the unpruned model.

Every model runs in this one process through the engine (quantization none: the pruned checkpoints are
dense floats, and so is the baseline, the source dequantized the same way). Speed is measured in rounds,
every model once per round in a rotating order, and reported as the median of same-round ratios to the
baseline (this shared machine drifts within minutes). Pruned directories are written under --work-dir
and reused when their compress.json records the same target and calibration text. Perplexity is scored
on the first --ppl-windows windows of each text; without --calibration the pruning is calibrated on
the first text's tokens after those windows (and one window of gap), never on scored text.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics

from scaleinfer.errors import ConfigError

TARGET_KEYS = {"layers": int, "ffn": float, "heads": int, "kv_heads": int, "params": float}


def parse_target(spec: str):
    """"layers=24", "params=0.7", "layers=20+ffn=0.75" -> PruneTarget."""
    from scaleinfer.compress.prune import PruneTarget

    fields = {}
    for part in spec.split("+"):
        key, _, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in TARGET_KEYS or not value:
            raise ConfigError(f"--targets: {part!r} is not KEY=VALUE with KEY one of {', '.join(TARGET_KEYS)}")
        try:
            fields[key] = TARGET_KEYS[key](value)
        except ValueError:
            raise ConfigError(f"--targets: {part!r} has a value that is not a number") from None
    return PruneTarget(**fields)


def held_out_calibration(args) -> str:
    """The first text past its scored windows (plus one window of gap), as a file under --work-dir."""
    from scaleinfer.weights.loader import open_checkpoint

    tok = open_checkpoint(args.model).tokenizer
    with open(args.texts[0], encoding="utf-8") as f:
        ids = tok.encode(f.read(), add_special_tokens=False)
    tail = ids[(args.ppl_windows + 1) * 512:]
    if len(tail) < 2048:
        raise ConfigError(f"{args.texts[0]} has only {len(tail)} tokens past the scored windows; pass --calibration")
    os.makedirs(args.work_dir, exist_ok=True)
    path = os.path.join(args.work_dir, "calibration-" + os.path.basename(args.texts[0]))
    with open(path, "w", encoding="utf-8") as f:
        f.write(tok.decode(tail))
    return path


def _pruned_dir(args, spec: str) -> str:
    from dataclasses import asdict

    from scaleinfer.compress.prune import prune_to_dir

    target = parse_target(spec)
    path = os.path.join(args.work_dir, spec.replace("=", "").replace("+", "_"))
    info = os.path.join(path, "compress.json")
    if os.path.isfile(info):
        with open(info, encoding="utf-8") as f:
            done = json.load(f)["prune"]
        if done["target"] == asdict(target) and done["calibration"] == args.calibration \
                and done["source"] == args.model:
            return path
    print(f"pruning {args.model} to {spec} -> {path}", flush=True)
    prune_to_dir(args.model, args.calibration, target, path, overwrite=True)
    return path


def _row(label: str, path: str, args) -> dict:
    from scaleinfer.bench.engines import ScaleInferAdapter
    from scaleinfer.bench.perplexity import perplexity

    adapter = ScaleInferAdapter(path, args.threads, 1, kv_cache_memory="256MiB", quantization="none")
    cfg = adapter.llm.engine.model_config
    model = adapter.llm.engine.model
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    row = {"label": label, "model": path, "layers": cfg.num_layers, "intermediate_size": cfg.intermediate_size,
           "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "params": params, "ppl": {}, "prefill_s": [],
           "decode_s": []}
    for text in args.texts:
        with open(text, encoding="utf-8") as f:
            result = perplexity(adapter.llm, f.read(), window=512, max_windows=args.ppl_windows)
        row["ppl"][os.path.basename(text)] = result.perplexity
    return row, adapter


def _measure_rounds(rows: list[dict], adapters: list, rounds: int) -> None:
    from scaleinfer.bench.workloads import decode_prompt, prefill_prompt

    vocab = adapters[0].vocab_size
    pp, tg = prefill_prompt(vocab), decode_prompt(vocab)
    for a in adapters:   # warm-up
        a.prefill_once(pp[:64])
        a.decode_once(tg)
    for r in range(rounds):
        order = list(range(len(rows)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            rows[i]["prefill_s"].append(adapters[i].prefill_once(pp))
            rows[i]["decode_s"].append(adapters[i].decode_once(tg)[0])


def _summarize(rows: list[dict]) -> None:
    base = rows[0]
    for row in rows:
        row["params_vs_base"] = row["params"] / base["params"]
        row["pp512_tok_s"] = len_pp() / statistics.median(row["prefill_s"])
        row["tg128_tok_s"] = 1.0 / statistics.median(row["decode_s"])
        row["prefill_speedup"] = statistics.median(b / s for b, s in zip(base["prefill_s"], row["prefill_s"]))
        row["decode_speedup"] = statistics.median(b / s for b, s in zip(base["decode_s"], row["decode_s"]))


def len_pp() -> int:
    from scaleinfer.bench.workloads import PREFILL_TOKENS

    return PREFILL_TOKENS


def _print_table(rows: list[dict], texts: list[str]) -> None:
    names = [os.path.basename(t) for t in texts]
    head = f"{'model':24} {'layers':>6} {'ffn':>5} {'heads':>5} {'params':>8} {'kept':>6} " + \
        " ".join(f"{'ppl ' + n[:12]:>18}" for n in names) + f" {'pp512 t/s':>10} {'x':>5} {'tg128 t/s':>10} {'x':>5}"
    print(head)
    for r in rows:
        print(f"{r['label'][:24]:24} {r['layers']:>6} {r['intermediate_size']:>5} {r['heads']:>2}/{r['kv_heads']:<2} "
              f"{r['params'] / 1e6:>7.1f}M {r['params_vs_base']:>6.1%} " +
              " ".join(f"{r['ppl'][n]:>18.2f}" for n in names) +
              f" {r['pp512_tok_s']:>10.0f} {r['prefill_speedup']:>5.2f} {r['tg128_tok_s']:>10.1f} "
              f"{r['decode_speedup']:>5.2f}")


def main(args) -> int:
    if args.threads is not None:
        __import__("torch").set_num_threads(args.threads)
    specs = [s for s in args.targets.split(",") if s.strip()]
    if args.calibration is None:
        args.calibration = held_out_calibration(args)
    models = [("base " + os.path.basename(args.model), args.model)]
    models += [(spec, _pruned_dir(args, spec)) for spec in specs]
    for extra in args.models or []:
        label, _, path = extra.rpartition("=")
        models.append((label or os.path.basename(os.path.normpath(path)), path))
    rows, adapters = [], []
    for label, path in models:
        row, adapter = _row(label, path, args)
        rows.append(row)
        adapters.append(adapter)
        print(f"loaded {label}: ppl " + ", ".join(f"{k} {v:.2f}" for k, v in row["ppl"].items()), flush=True)
    _measure_rounds(rows, adapters, args.rounds)
    _summarize(rows)
    _print_table(rows, args.texts)
    import psutil

    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "base": args.model,
              "calibration": args.calibration, "texts": args.texts, "ppl_windows": args.ppl_windows, "window": 512,
              "rounds": args.rounds, "threads": args.threads, "load_average": os.getloadavg(),
              "cpu_count": psutil.cpu_count(), "machine": platform.machine(), "rows": rows}
    os.makedirs(args.output_dir, exist_ok=True)
    out = os.path.join(args.output_dir, f"prune-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
    print(f"wrote {out}")
    return 0


def add_arguments(p) -> None:
    from scaleinfer.config import DEFAULT_MODEL, model_cache_dir

    p.add_argument("--model", default=DEFAULT_MODEL, help="the model to prune (the baseline row)")
    p.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="calibration text for pruning (default: the first text past its scored windows)")
    p.add_argument("--targets", default="layers=24,ffn=0.75,params=0.7,params=0.5",
                   help="comma-separated targets, each KEY=VALUE[+KEY=VALUE] with keys layers, ffn, heads, "
                        "kv_heads, params (default: %(default)s)")
    p.add_argument("--models", action="append", default=None, metavar="LABEL=DIR",
                   help="more rows, e.g. a distilled student (repeatable)")
    p.add_argument("--texts", nargs="+", default=["data/shakespeare-en.txt", "data/hongloumeng-zh.txt"])
    p.add_argument("--ppl-windows", type=int, default=8, help="512-token windows scored per text (default: "
                                                              "%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="speed rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work-dir", default=os.path.join(model_cache_dir(), "pruned"),
                   help="where pruned checkpoints are written and reused (default: %(default)s)")
    p.add_argument("--output-dir", default="benchmarks/results")
