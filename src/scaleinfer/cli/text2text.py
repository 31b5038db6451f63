"""translate | summarize: text-to-text encoder-decoder models (T5, BART, Marian) over texts given as
arguments or as lines of stdin, one output line per input, all inputs batched through one engine.

T5 is steered by a task prefix ("translate English to German: ", "summarize: "), which these commands
add for a T5 model (--prefix overrides it; Marian and BART models are trained for one task and get none,
except a multilingual Marian model's `>>xxx<<` target-language token for --target-lang xxx).
Beam search by default (--num-beams 4, as translation models are usually decoded); --num-beams 1 is greedy.
"""
from __future__ import annotations

import sys

from scaleinfer.cli.common import engine_args, make_llm
from scaleinfer.errors import ConfigError, RequestError

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian", "es": "Spanish", "it": "Italian",
             "zh": "Chinese", "ja": "Japanese", "ru": "Russian", "pt": "Portuguese", "nl": "Dutch"}


def _language(code: str) -> str:
    return LANGUAGES.get(code.lower(), code)


def task_prefix(args, architecture: str, language_codes=()) -> str:
    """The text put before each input: --prefix, or T5's task prefix, or a multilingual Marian model's
    target-language token (`>>cmn_Hans<< ` for --target-lang cmn_Hans), or nothing."""
    if args.prefix is not None:
        return args.prefix
    if language_codes and args.target_lang:
        if f">>{args.target_lang}<<" not in language_codes:
            raise ConfigError(f"--target-lang {args.target_lang}: this model's target languages are "
                              f"{', '.join(c[2:-2] for c in sorted(language_codes)[:20])}"
                              f"{' ...' if len(language_codes) > 20 else ''}")
        return f">>{args.target_lang}<< "
    if architecture != "t5":
        return ""
    if args.command == "summarize":
        return "summarize: "
    return f"translate {_language(args.source_lang)} to {_language(args.target_lang or 'de')}: "


def read_inputs(args) -> list[str]:
    texts = list(args.texts) if args.texts else [line.rstrip("\n") for line in sys.stdin]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise RequestError("nothing to process: give texts as arguments or lines on stdin")
    return texts


def cmd_text2text(args) -> int:
    from scaleinfer.models.encoder_decoder import is_encoder_decoder
    from scaleinfer.sampling_params import SamplingParams

    if args.num_beams < 1:
        raise ConfigError(f"--num-beams {args.num_beams}: must be 1 (greedy) or more")
    texts = read_inputs(args)
    llm = make_llm(args)
    engine = llm.engine
    if not is_encoder_decoder(engine.model):
        raise ConfigError(f"{args.model} is a decoder-only model ({engine.model_config.architecture}); `scaleinfer "
                          f"{args.command}` needs a text-to-text encoder-decoder (T5, BART, Marian), e.g. "
                          f"--model Helsinki-NLP/opus-mt-en-de; use `scaleinfer generate` for this one")
    prefix = task_prefix(args, engine.model_config.architecture, getattr(llm.tokenizer, "language_codes", ()))
    if args.num_beams > 1:
        params = SamplingParams(temperature=0, use_beam_search=True, n=1, best_of=args.num_beams,
                                max_tokens=args.max_tokens, length_penalty=args.length_penalty)
    else:
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for out in llm.generate([prefix + t for t in texts], params):
        print(out.outputs[0].text.strip())
    return 0


def register(sub) -> None:
    for name, help_text in (("translate", "translate texts (arguments or stdin lines) with a T5 / BART / Marian "
                                          "model"),
                            ("summarize", "summarize texts (arguments or stdin lines) with a T5 / BART model")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("texts", nargs="*", help="texts to process (default: one per line of stdin)")
        if name == "translate":
            p.add_argument("--source-lang", default="en", help="source language for T5's prefix (default: en)")
            p.add_argument("--target-lang", default=None, help="target language: T5's prefix (default: de), or a "
                                                               "multilingual Marian model's >>xxx<< token")
        else:
            p.set_defaults(source_lang="", target_lang="")
        p.add_argument("--prefix", default=None, help="text put before every input (default: T5's task prefix, "
                                                      "none for other models)")
        p.add_argument("--num-beams", type=int, default=4, help="beam width; 1 = greedy (default: %(default)s)")
        p.add_argument("--length-penalty", type=float, default=1.0,
                       help="beam search: score = logprob / length ** penalty (default: %(default)s)")
        p.add_argument("--max-tokens", type=int, default=256, help="longest output (default: %(default)s)")
        engine_args(p)
        p.set_defaults(fn=cmd_text2text)
