"""`scaleinfer bench seq2seq`: Whisper transcription speed and word error, scaleinfer vs faster-whisper
(CTranslate2) vs HF transformers, on the same whisper-base weights and the same threads, in one run.

Workloads (jfk.flac, 11 s of speech):
  long        jfk.flac repeated to --long-seconds (default 300 s) of audio, one request: windows decode
              one after another (each depends on the previous one's timestamps), real-time factor
  concurrent  --concurrency (default 32) requests of jfk.flac at once: requests/s and real-time factor
              (scaleinfer batches their windows; faster-whisper transcribes them one after another, its
              usual one-worker deployment; HF generates them as one padded batch)

Each engine runs in a process of its own (spawned), so its peak RSS is its own. Greedy decoding (or
--beam-size N beams in every engine) with the references' default temperature fallback (a window whose
text compresses more than --compression-ratio-threshold, 2.4, or averages under -1 log-probability per token
is sampled again; `--compression-ratio-threshold none` drops the first test in every engine); word error
rate against the known transcript (lowercased, no punctuation). Results go to --output-dir as seq2seq-DATE.json.

Like for like: faster-whisper's compute_type "int8" multiplies int8 weights by int8 activations quantized per
row (CTranslate2's int8 GEMM), which is our `w8a8`, the default int8 row here; our `int8` is weight-only (the
encoder's 1,500-row products then run in fp32 on dequantized slices).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import re
import resource
import sys
import time

JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
DEFAULT_ENGINES = "scaleinfer:none,scaleinfer:w8a8,faster-whisper:float32,faster-whisper:int8,hf"


def add_arguments(p) -> None:
    p.add_argument("--model", default="whisper-base", help="catalog name or CTranslate2 directory (default: %(default)s)")
    p.add_argument("--audio", default=str(pathlib.Path(__file__).resolve().parents[3] / "data" / "jfk.flac"))
    p.add_argument("--engines", default=DEFAULT_ENGINES,
                   help="comma-separated: scaleinfer:QUANTIZATION, faster-whisper:COMPUTE_TYPE, hf "
                        "(default: %(default)s)")
    p.add_argument("--workloads", default="long,concurrent", help="long, concurrent (default: %(default)s)")
    p.add_argument("--long-seconds", type=float, default=300.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every engine (default: %(default)s)")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--beam-size", type=int, default=1,
                   help="beams of the temperature-0 decode in every engine; 1 = greedy (default: %(default)s; "
                        "faster-whisper's own default is 5)")
    from scaleinfer.speech.transcribe import TranscriptionOptions

    p.add_argument("--compression-ratio-threshold", type=_ratio,
                   default=TranscriptionOptions.compression_ratio_threshold,
                   help="temperature fallback when a window's text compresses more than this, in every engine "
                        "(default: %(default)s, both references' own; 'none' turns the check off: the long "
                        "workload repeats one sentence, which trips it by construction)")
    p.add_argument("--quick", action="store_true", help="60 s of long audio and 8 concurrent requests (smoke run)")


def _ratio(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if value <= 0:
        raise ValueError(text)
    return value


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def word_error_rate(hypothesis: str, reference: str) -> float:
    """Levenshtein distance over words / reference words."""
    h, r = words(hypothesis), words(reference)
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1] / max(1, len(r))


def _workload_audio(audio_path: str, name: str, long_seconds: float, concurrency: int):
    import numpy as np

    from scaleinfer.speech.audio import load_audio

    clip = load_audio(audio_path)
    if name == "long":
        reps = max(1, int(long_seconds * 16000 // clip.size))
        return [np.tile(clip, reps)], reps
    return [clip] * concurrency, 1


def _run_scaleinfer(model: str, quantization: str, threads: int, audios, beam_size: int,
                    ratio: float | None) -> list[str]:
    from scaleinfer import LLM
    from scaleinfer.speech.transcribe import TranscriptionOptions

    llm = LLM(model, threads=threads, quantization=quantization, kv_cache_memory="2GiB")
    llm.transcribe(audios[0][:16000 * 5], sample_rate=16000)   # warm-up
    start = time.perf_counter()
    out = llm.transcribe(list(audios), sample_rate=16000, beam_size=beam_size if beam_size > 1 else None,
                         options=TranscriptionOptions(compression_ratio_threshold=ratio))
    return [t.text for t in out], time.perf_counter() - start


def _run_faster_whisper(model_dir: str, compute_type: str, threads: int, audios, beam_size: int,
                        ratio: float | None):
    from faster_whisper import WhisperModel

    fw = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=threads)
    list(fw.transcribe(audios[0][:16000 * 5], beam_size=1)[0])
    start = time.perf_counter()
    texts = ["".join(s.text for s in fw.transcribe(a, beam_size=beam_size, compression_ratio_threshold=ratio)[0])
             for a in audios]
    return texts, time.perf_counter() - start


def _run_hf(model_dir: str, threads: int, audios, beam_size: int):
    """HF transformers generate() on the same weights: the clips as one padded batch (30 s windows; its
    long-form mode is not measured here)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from scaleinfer.speech.features import log_mel_spectrogram, pad_or_trim
    from scaleinfer.weights.ct2_whisper import hf_config_kwargs, hf_state_dict
    from scaleinfer.weights.loader import open_checkpoint

    if any(a.size > 16000 * 30 for a in audios):
        raise ValueError("long-form audio is not measured for HF here (30 s windows only)")
    torch.set_num_threads(threads)
    ckpt = open_checkpoint(model_dir)
    model = WhisperForConditionalGeneration(WhisperConfig(**hf_config_kwargs(ckpt.config))).eval()
    model.load_state_dict(hf_state_dict(ckpt.tensors(), ckpt.config.hidden_size))
    start = time.perf_counter()
    with torch.inference_mode():
        feats = torch.stack([pad_or_trim(log_mel_spectrogram(a)) for a in audios])
        tokens = [ckpt.tokenizer.backend.token_to_id(t) for t in
                  ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")]
        ids = model.generate(input_features=feats, decoder_input_ids=torch.tensor([tokens] * len(audios)),
                             max_new_tokens=200, do_sample=False, num_beams=beam_size)
    eot = ckpt.tokenizer.backend.token_to_id("<|endoftext|>")
    texts = [ckpt.tokenizer.decode([t for t in row.tolist() if t < eot]) for row in ids]
    return texts, time.perf_counter() - start


def _worker(engine: str, args: dict, workload: str, queue) -> None:
    from scaleinfer import catalog

    try:
        audios, reps = _workload_audio(args["audio"], workload, args["long_seconds"], args["concurrency"])
        model_dir = catalog.resolve(args["model"]) if catalog.is_catalog_name(args["model"]) else args["model"]
        kind, _, mode = engine.partition(":")
        if kind == "scaleinfer":
            texts, seconds = _run_scaleinfer(args["model"], mode or "none", args["threads"], audios,
                                             args["beam_size"], args["compression_ratio_threshold"])
        elif kind == "faster-whisper":
            texts, seconds = _run_faster_whisper(model_dir, mode or "float32", args["threads"], audios,
                                                 args["beam_size"], args["compression_ratio_threshold"])
        elif kind == "hf":
            texts, seconds = _run_hf(model_dir, args["threads"], audios, args["beam_size"])
        else:
            raise ValueError(f"unknown engine {engine!r}")
        audio_s = sum(a.size for a in audios) / 16000
        reference = " ".join([JFK_TEXT] * reps)
        wer = sum(word_error_rate(t, reference) for t in texts) / len(texts)
        queue.put({"engine": engine, "workload": workload, "requests": len(audios), "audio_seconds": audio_s,
                   "seconds": seconds, "rtf": seconds / audio_s, "requests_per_s": len(audios) / seconds,
                   "wer": wer, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "sample_text": texts[0][:200]})
    except Exception as exc:  # noqa: BLE001 - reported in the results, the other engines go on
        queue.put({"engine": engine, "workload": workload, "error": f"{type(exc).__name__}: {exc}"})


def main(args) -> int:
    if not 1 <= args.beam_size <= 16:
        print(f"error: --beam-size must be 1 to 16, got {args.beam_size}", file=sys.stderr)
        return 2
    if args.quick:
        args.long_seconds, args.concurrency = 60.0, 8
    ctx = multiprocessing.get_context("spawn")
    shared = {"audio": args.audio, "model": args.model, "long_seconds": args.long_seconds,
              "concurrency": args.concurrency, "threads": args.threads,
              "beam_size": args.beam_size, "compression_ratio_threshold": args.compression_ratio_threshold}
    results = []
    for workload in args.workloads.split(","):
        for engine in args.engines.split(","):
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(engine, shared, workload, queue))
            proc.start()
            row = queue.get()
            proc.join()
            results.append(row)
            print(_line(row), flush=True)
    load = os.getloadavg()
    report = {"bench": "seq2seq", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": args.model,
              "threads": args.threads, "beam_size": args.beam_size,
              "compression_ratio_threshold": args.compression_ratio_threshold, "loadavg_at_end": load,
              "cpu_count": os.cpu_count(), "results": results}
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"seq2seq-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path} (load average at the end {load[0]:.1f})")
    return 0


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['workload']:10s} {r['engine']:24s} error: {r['error']}"
    return (f"{r['workload']:10s} {r['engine']:24s} {r['requests']:3d} req, {r['audio_seconds']:7.1f} s audio in "
            f"{r['seconds']:7.1f} s: RTF {r['rtf']:.3f}, {r['requests_per_s']:.3f} req/s, WER {r['wer']:.3f}, "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB")
