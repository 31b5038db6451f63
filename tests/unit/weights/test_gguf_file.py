"""Our GGUF header parser against gguf.GGUFReader, the reference reader, on every value type."""
from __future__ import annotations

import time

import numpy as np
from gguf import GGUFReader, GGUFWriter

from scaleinfer.weights.gguf_file import GGUFFile


def test_metadata_and_tensor_table_equal_gguf_reader(tmp_path):
    path = tmp_path / "types.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 1 << 31)
    writer.add_int32("t.i32", -(1 << 30))
    writer.add_float32("t.f32", 0.25)
    writer.add_uint64("t.u64", 1 << 40)
    writer.add_int64("t.i64", -(1 << 40))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo 世界 👋")
    writer.add_array("t.strs", ["a", "", "日本語", "Ġthe"])
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b", np.ones((2, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, ref = GGUFFile.open(str(path)), GGUFReader(str(path))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[key]
        if key == "t.nested":  # GGUFReader flattens arrays of arrays; we keep their structure
            assert got == [[1, 2], [3]] and sum(got, []) == want
            continue
        assert got == want or np.allclose(got, want), key
    assert [t.name for t in ours.tensors] == ["a", "b"]
    for mine, theirs in zip(ours.tensors, ref.tensors):
        assert mine.shape == tuple(reversed(theirs.shape.tolist()))
        assert mine.ggml_type == theirs.tensor_type and mine.offset == theirs.data_offset
        assert np.array_equal(ours.tensor_bytes(mine).reshape(-1), np.asarray(theirs.data).view(np.uint8).reshape(-1))


def test_real_header_is_fast(smollm2_gguf_path):
    start = time.perf_counter()
    gf = GGUFFile.open(smollm2_gguf_path)
    elapsed = time.perf_counter() - start
    assert len(gf.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(gf.metadata["tokenizer.ggml.merges"]) == 48900
    assert elapsed < 1.0, f"parsing the SmolLM2 header took {elapsed:.2f} s"
