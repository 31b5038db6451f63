"""Fuzzing the GGUF reader with mutated real files: each one loads, or fails with one project error line.

Mutations are seeded and aimed at the structure (gguf_fields.walk maps every field of the intact file):
truncation at every field boundary, huge counts and lengths, wrong type tags, offsets past the end or
unaligned, dims whose product overflows, duplicate names, non-UTF-8 bytes in strings, and random bit flips.
The files are a tiny model (read all the way: config, tokenizer, chat template, every tensor in both
forms) and the header of SmolLM2's real Q4_1 file (its tensor data replaced by a sparse hole).
"""
from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import signal
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType

from scaleinfer.errors import ScaleInferError, WeightLoadError
from scaleinfer.tokenizer import Tokenizer
from scaleinfer.weights import gguf
from scaleinfer.weights.gguf_file import GGUFFile

from .gguf_fields import Field, walk
from .tiny_gguf import write_tiny_gguf

_U64_VALUES = (0, 1, 3, 1 << 31, 1 << 32, 1 << 62, 1 << 63, (1 << 64) - 1)
_U32_VALUES = (0, 1, 5, 13, 255, 1 << 31, (1 << 32) - 1)
_TYPE_TAGS = (*range(15), 200, (1 << 32) - 1)
_PER_CHECK_SECONDS = 20


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail (rather than hang the suite) if one load takes longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"loading a mutated GGUF took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _load(path: str, deep: bool) -> None:
    gf = GGUFFile.open(path)
    config = gguf.read_model_config(gf)
    gguf.check_tensor_types(gf)
    fields = gguf.tokenizer_fields(gf)
    if not deep:
        return
    tokenizer = Tokenizer.from_gguf_fields(fields)
    tokenizer.encode("hello there")
    if tokenizer.chat_template:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    for direct_int4 in (False, True):
        for _ in gguf.iter_tensors(gf, config, direct_int4):
            pass


def _outcome(path: str, deep: bool) -> str:
    """'ok', or the project error's one-line message; any other exception fails the test."""
    try:
        with _deadline(_PER_CHECK_SECONDS):
            _load(path, deep)
    except ScaleInferError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 600, repr(message[:400])
        return message
    return "ok"


def _put(buf: bytes, field: Field, value: int) -> bytes:
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[field.width]
    return buf[:field.pos] + struct.pack(fmt, value % (1 << (8 * field.width))) + buf[field.pos + field.width:]


def _mutations(buf: bytes, fields: list[Field], rng: random.Random, budget: int, cuts: bool = True):
    """(description, mutated bytes), made one at a time: truncations at every boundary (and mid-field)
    first, then `budget` seeded ones."""
    header = [f for f in fields if f.kind != "data"]
    for field in header if cuts else ():
        for cut in {field.pos, field.pos + field.width // 2}:
            yield f"cut at {cut} ({field.kind} of {field.owner!r})", buf[:cut]
    by_kind: dict[str, list[Field]] = {}
    for field in header:
        by_kind.setdefault(field.kind, []).append(field)
    names = {}
    for field in header:
        if field.kind == "string":
            names.setdefault((field.owner[:4] == "blk." or field.owner in ("token_embd.weight", "output.weight",
                                                                             "output_norm.weight"), field.width),
                             []).append(field)
    data_end = len(buf)
    for _ in range(budget):
        choice = rng.randrange(8)
        if choice == 0:  # a count or length (u64) set to an extreme
            field = rng.choice(by_kind["count"] + by_kind["array_count"] + by_kind["str_len"] + by_kind["key_len"]
                               + by_kind["tensor_name_len"] + by_kind["dim"])
            value = rng.choice(_U64_VALUES + (data_end, data_end - field.pos))
            yield f"{field.kind} of {field.owner!r} := {value}", _put(buf, field, value)
        elif choice == 1:  # a type tag
            field = rng.choice(by_kind["value_type"] + by_kind["elem_type"] + by_kind["ggml_type"])
            value = rng.choice(_TYPE_TAGS + (rng.randrange(1 << 32),))
            yield f"{field.kind} of {field.owner!r} := {value}", _put(buf, field, value)
        elif choice == 2:  # a tensor's data offset: past the end, unaligned, overflowing
            field = rng.choice(by_kind["offset"])
            old = struct.unpack_from("<Q", buf, field.pos)[0]
            value = rng.choice((data_end, data_end * 2, old + 1, old + 32, (1 << 63) + old, (1 << 64) - 32))
            yield f"offset of {field.owner!r} := {value}", _put(buf, field, value)
        elif choice == 3:  # dims: zero, or a product that overflows 64 bits
            field = rng.choice(by_kind["dim"] + by_kind["n_dims"])
            value = rng.choice((0, 2, 5, 1 << 32, 1 << 40, (1 << 64) - 1) if field.kind == "dim" else _U32_VALUES)
            yield f"{field.kind} of {field.owner!r} := {value}", _put(buf, field, value)
        elif choice == 4:  # duplicate: one name (or key) copied over another of the same length
            same = [group for group in names.values() if len(group) > 1]
            source, target = rng.sample(rng.choice(same), 2)
            copied = buf[source.pos:source.pos + source.width]
            yield (f"{target.owner!r} renamed {source.owner!r}",
                   buf[:target.pos] + copied + buf[target.pos + target.width:])
        elif choice == 5:  # non-UTF-8 bytes inside a string
            field = rng.choice(by_kind["string"])
            at = field.pos + rng.randrange(field.width)
            yield f"byte {at} in {field.owner!r} := 0xff", buf[:at] + b"\xff" + buf[at + 1:]
        elif choice == 6:  # a scalar metadata value set to an extreme
            field = rng.choice(by_kind["scalar"])
            value = rng.choice(_U64_VALUES if field.width == 8 else _U32_VALUES)
            yield f"value of {field.owner!r} := {value}", _put(buf, field, value)
        else:  # random bit flips anywhere (header or tensor data)
            mutated = bytearray(buf)
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            yield "bit flips", bytes(mutated)


@pytest.fixture
def scratch(tmp_path):
    """A directory for the mutated files: in memory (/dev/shm) where there is one, as hundreds are written."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = tempfile.mkdtemp(prefix="scaleinfer-gguf-fuzz-", dir="/dev/shm")
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write(path, data: bytes, size: int | None = None) -> str:
    with open(path, "wb") as f:
        f.write(data)
    if size is not None and size > len(data):
        os.truncate(path, size)  # a sparse hole stands in for the tensor data
    return str(path)


@pytest.mark.parametrize("arch,qtype,cuts", [("llama", GGMLQuantizationType.Q4_0, True),
                                             ("qwen2", GGMLQuantizationType.Q8_0, False)])
def test_mutated_tiny_model_loads_or_fails_in_one_line(tmp_path, scratch, arch, qtype, cuts):
    original = tmp_path / "tiny.gguf"
    write_tiny_gguf(original, arch=arch, qtype=qtype, num_layers=2, tied=False)
    buf = original.read_bytes()
    assert _outcome(str(original), deep=True) == "ok"
    fields = walk(buf)
    rng = random.Random(f"gguf-fuzz-{arch}")
    outcomes = []
    tracemalloc.start()
    try:
        for what, data in _mutations(buf, fields, rng, budget=200, cuts=cuts):
            tracemalloc.reset_peak()
            result = _outcome(_write(scratch / "m.gguf", data), deep=True)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 64 * len(buf) + (16 << 20), f"{what}: peak allocation {peak} bytes"
            if what.startswith("cut at"):
                assert result != "ok", f"{what}: a truncated file loaded"
            outcomes.append(result)
    finally:
        tracemalloc.stop()
    assert len(outcomes) >= 200 and 0 < outcomes.count("ok") < len(outcomes)


def test_mutated_smollm2_header_loads_or_fails_in_one_line(scratch, smollm2_gguf_path):
    size = os.path.getsize(smollm2_gguf_path)
    with open(smollm2_gguf_path, "rb") as f:
        head = f.read(2 << 20)
    fields = walk(head[:_header_end(head)])
    data_start = fields[-1].pos
    header = head[:data_start]
    rng = random.Random("gguf-fuzz-smollm2")
    assert _outcome(_write(scratch / "m.gguf", header, size), deep=False) == "ok"
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = []
    boundaries = [f for f in fields if f.kind in ("count", "key_len", "value_type", "array_count", "tensor_name_len",
                                                  "n_dims", "offset")]
    for field in rng.sample(boundaries, 10):  # a sample of the boundaries: each parse takes ~0.1 s
        assert _outcome(_write(scratch / "cut.gguf", header[:field.pos], size), deep=False) != "ok"
    for what, data in _mutations(header, fields, rng, budget=40, cuts=False):
        outcomes.append(_outcome(_write(scratch / "m.gguf", data, size), deep=False))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024
    assert len(outcomes) == 40 and grown_mib < 256, f"peak memory grew by {grown_mib:.0f} MiB"


def _header_end(head: bytes) -> int:
    """Where SmolLM2's tensor table ends (within the first 2 MiB), found by the reader itself."""
    fields = walk(head + b"\0" * 16)
    return fields[-1].pos


def test_huge_string_length_in_vocabulary_is_a_one_line_error(tmp_path, smollm2_gguf_path):
    """The issue's defect: a vocabulary string claiming 2**62 bytes gave OverflowError and a traceback."""
    with open(smollm2_gguf_path, "rb") as f:
        head = f.read(2 << 20)
    tokens = [f for f in walk(head[:_header_end(head)]) if f.kind == "str_len" and f.owner == "tokenizer.ggml.tokens"]
    for value in (1 << 62, (1 << 64) - 1, 1 << 40):
        path = _write(tmp_path / "bad.gguf", _put(head, tokens[1], value), os.path.getsize(smollm2_gguf_path))
        with pytest.raises(WeightLoadError, match="not a valid GGUF file: a string at byte"):
            GGUFFile.open(path)


def test_duplicate_tensor_name_is_refused(tmp_path):
    original = tmp_path / "tiny.gguf"
    write_tiny_gguf(original, num_layers=1)
    buf = original.read_bytes()
    fields = walk(buf)
    q, k = (next(f for f in fields if f.kind == "string" and f.owner == f"blk.0.attn_{x}.weight") for x in "qk")
    dup = buf[:k.pos] + buf[q.pos:q.pos + q.width] + buf[k.pos + k.width:]
    with pytest.raises(WeightLoadError, match="'blk.0.attn_q.weight' appears twice"):
        GGUFFile.open(_write(tmp_path / "dup.gguf", dup))


def test_shape_that_disagrees_with_metadata_is_refused(tmp_path):
    original = tmp_path / "tiny.gguf"
    write_tiny_gguf(original, num_layers=2)
    fields = walk(original.read_bytes())
    block_count = next(f for f in fields if f.kind == "scalar" and f.owner == "llama.block_count")
    path = _write(tmp_path / "m.gguf", _put(original.read_bytes(), block_count, 1 << 16))
    with pytest.raises(WeightLoadError, match="declares 65536 layers"):
        gguf.read_model_config(GGUFFile.open(path))
