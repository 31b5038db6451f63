"""Transcription outputs as OpenAI's /v1/audio API and the CLI write them: text, json, verbose_json, srt,
vtt; and the language names OpenAI's verbose_json uses."""
from __future__ import annotations

from scaleinfer.errors import RequestError
from scaleinfer.speech.transcribe import Transcription

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")

_LANGUAGES = (
    "en english zh chinese de german es spanish ru russian ko korean fr french ja japanese pt portuguese "
    "tr turkish pl polish ca catalan nl dutch ar arabic sv swedish it italian id indonesian hi hindi "
    "fi finnish vi vietnamese he hebrew uk ukrainian el greek ms malay cs czech ro romanian da danish "
    "hu hungarian ta tamil no norwegian th thai ur urdu hr croatian bg bulgarian lt lithuanian la latin "
    "mi maori ml malayalam cy welsh sk slovak te telugu fa persian lv latvian bn bengali sr serbian "
    "az azerbaijani sl slovenian kn kannada et estonian mk macedonian br breton eu basque is icelandic "
    "hy armenian ne nepali mn mongolian bs bosnian kk kazakh sq albanian sw swahili gl galician "
    "mr marathi pa punjabi si sinhala km khmer sn shona yo yoruba so somali af afrikaans oc occitan "
    "ka georgian be belarusian tg tajik sd sindhi gu gujarati am amharic yi yiddish lo lao uz uzbek "
    "fo faroese ht haitian_creole ps pashto tk turkmen nn nynorsk mt maltese sa sanskrit "
    "lb luxembourgish my myanmar bo tibetan tl tagalog mg malagasy as assamese tt tatar haw hawaiian "
    "ln lingala ha hausa ba bashkir jw javanese su sundanese yue cantonese").split()
LANGUAGE_NAMES = {code: name.replace("_", " ") for code, name in zip(_LANGUAGES[::2], _LANGUAGES[1::2])}
"""ISO code -> English name, in Whisper's token order."""


def language_code(language: str | None) -> str | None:
    """An ISO code from a code or an English name ("en", "English"); None stays None."""
    if language is None or not language.strip():
        return None
    key = language.strip().lower()
    if key in LANGUAGE_NAMES:
        return key
    by_name = {name: code for code, name in LANGUAGE_NAMES.items()}
    if key in by_name:
        return by_name[key]
    raise RequestError(f"unknown language {language!r}; use an ISO 639-1 code such as en, de, zh")


def _clock(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def to_srt(t: Transcription) -> str:
    blocks = [f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
              for i, s in enumerate(t.segments, 1)]
    return "\n".join(blocks)


def to_vtt(t: Transcription) -> str:
    blocks = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_verbose_json(t: Transcription, task: str) -> dict:
    return {
        "task": task, "language": LANGUAGE_NAMES.get(t.language, t.language), "duration": round(t.duration, 3),
        "text": t.text.strip(),
        "segments": [{"id": s.id - 1, "seek": s.seek, "start": round(s.start, 3), "end": round(s.end, 3),
                      "text": s.text, "tokens": s.tokens, "temperature": s.temperature,
                      "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
                      "no_speech_prob": s.no_speech_prob} for s in t.segments],
    }


def render(t: Transcription, response_format: str, task: str) -> str | dict:
    """The response body: a dict for json / verbose_json, text for the others."""
    if response_format == "json":
        return {"text": t.text.strip()}
    if response_format == "verbose_json":
        return to_verbose_json(t, task)
    if response_format == "srt":
        return to_srt(t)
    if response_format == "vtt":
        return to_vtt(t)
    if response_format == "text":
        return t.text.strip() + "\n"
    raise RequestError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}")


def timestamped_lines(t: Transcription) -> str:
    """The CLI's --timestamps view: one "[mm:ss.mmm --> mm:ss.mmm]  text" line per segment."""
    def short(x: float) -> str:
        clock = _clock(x, ".")
        return clock[3:] if clock.startswith("00:") else clock

    return "".join(f"[{short(s.start)} --> {short(s.end)}] {s.text.strip()}\n" for s in t.segments)
