"""Speech: audio decoding and log-mel features (audio.py, features.py), and the Whisper transcription loop
over the engine (transcribe.py: windows, language detection, timestamps, temperature fallback)."""
