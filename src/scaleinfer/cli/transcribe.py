"""transcribe: speech to text (or, --task translate, to English text) with a Whisper model."""
from __future__ import annotations

import json
import sys

from scaleinfer.cli.common import engine_args, make_llm


def cmd_transcribe(args) -> int:
    import os

    from scaleinfer.errors import RequestError
    from scaleinfer.speech.formats import language_code, render, timestamped_lines
    from scaleinfer.speech.transcribe import TranscriptionOptions

    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:   # before the model loads
        raise RequestError(f"audio file not found: {missing[0]}")

    opts = TranscriptionOptions(language=language_code(args.language), task=args.task,
                                without_timestamps=args.without_timestamps, initial_prompt=args.prompt,
                                temperatures=tuple(args.temperature) if args.temperature else
                                TranscriptionOptions.temperatures, seed=args.seed, beam_size=args.beam_size,
                                patience=args.patience, length_penalty=args.length_penalty)
    llm = make_llm(args)
    results = llm.transcribe(list(args.files), options=opts)
    for path, result in zip(args.files, results):
        if len(args.files) > 1:
            print(f"==> {path} <==")
        if args.timestamps and args.format == "text":
            sys.stdout.write(timestamped_lines(result))
            continue
        body = render(result, args.format, args.task)
        sys.stdout.write(json.dumps(body, ensure_ascii=False) + "\n" if isinstance(body, dict) else body)
        if not args.verbose:
            continue
        print(f"[{result.language} {result.language_probability or 1.0:.2f}, {result.duration:.1f} s of audio]",
              file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("transcribe", help="speech to text with Whisper (any audio file FFmpeg reads)")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (several run together, batched)")
    p.add_argument("--task", choices=["transcribe", "translate"], default="transcribe",
                   help="transcribe in the spoken language, or translate to English (default: %(default)s)")
    p.add_argument("--language", default=None, help="spoken language, e.g. en or German (default: detected)")
    p.add_argument("--timestamps", action="store_true", help="print each segment with its start and end time")
    p.add_argument("--format", choices=["text", "json", "verbose_json", "srt", "vtt"], default="text",
                   help="output format (default: %(default)s)")
    p.add_argument("--without-timestamps", action="store_true",
                   help="decode without timestamp tokens (faster; long audio is then cut every 30 s)")
    p.add_argument("--prompt", default=None, help="text that precedes the audio (spelling, names, style)")
    p.add_argument("--temperature", type=float, action="append", default=None,
                   help="decoding temperature, repeatable for the fallback ladder (default: 0 0.2 ... 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fallback temperatures' sampling")
    p.add_argument("--beam-size", type=int, default=None, metavar="N",
                   help="beam search with N beams at temperature 0 (openai-whisper's choice: 5; default: greedy)")
    p.add_argument("--patience", type=float, default=1.0,
                   help="beam search: stop once round(N * patience) sequences finished (default: %(default)s)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: score = sum logprob / length ** length_penalty (default: %(default)s)")
    engine_args(p)
    p.set_defaults(fn=cmd_transcribe, model="whisper-base")
