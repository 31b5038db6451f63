"""Encoder parity with HF transformers on tiny random configs (saved as HF directories, loaded by our
loader): BERT / MPNet / RoBERTa / XLM-RoBERTa backbones, sequence- and token-classification heads, on a
padded HF batch vs our packed one."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaleinfer.attention.varlen import VarlenMetadata, reference_attention, varlen_attention  # noqa: E402
from scaleinfer.engine.encoder_engine import EncoderEngine  # noqa: E402
from scaleinfer.models.mpnet import relative_position_bucket  # noqa: E402
from scaleinfer.runner.encoder_runner import EncoderInput  # noqa: E402
from scaleinfer.weights.encoder import load_encoder, open_encoder  # noqa: E402

LENS = [7, 3, 12, 1, 5]
COMMON = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64, id2label={0: "NEG", 1: "NEU", 2: "POS"}, label2id={"NEG": 0, "NEU": 1, "POS": 2})
CASES = {
    "bert": (transformers.BertConfig, {"type_vocab_size": 2, "hidden_act": "gelu"}),
    "mpnet": (transformers.MPNetConfig, {"relative_attention_num_buckets": 32}),
    "roberta": (transformers.RobertaConfig, {"pad_token_id": 1, "type_vocab_size": 1}),
    "xlm-roberta": (transformers.XLMRobertaConfig, {"pad_token_id": 1, "type_vocab_size": 1}),
    "distilbert": (transformers.DistilBertConfig, {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 37}),
}
HEADS = {"": "Model", "classify": "ForSequenceClassification", "token-classify": "ForTokenClassification"}
PREFIX = {"bert": "Bert", "mpnet": "MPNet", "roberta": "Roberta", "xlm-roberta": "XLMRoberta",
          "distilbert": "DistilBert"}


def _save(tmp_path, kind: str, head: str):
    torch.manual_seed(0)
    cfg_cls, extra = CASES[kind]
    common = COMMON if kind != "distilbert" else {k: v for k, v in COMMON.items() if k not in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    cfg = cfg_cls(**common, **extra)
    model = getattr(transformers, PREFIX[kind] + HEADS[head])(cfg).eval()
    path = tmp_path / f"{kind}-{head or 'base'}"
    model.save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, 99)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")   # a WordPiece tokenizer for the engine
    return model, str(path)


def _padded(seqs, pad_id):
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad_id)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def _seqs(pad_id):
    g = torch.Generator().manual_seed(1)
    return [[t if t != pad_id else 5 for t in torch.randint(3, 99, (n,), generator=g).tolist()] for n in LENS]


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("head", list(HEADS))
def test_matches_hf(tmp_path, kind, head):
    hf, path = _save(tmp_path, kind, head)
    ckpt = open_encoder(path)
    assert ckpt.config.task == (head or "embed")
    ours = load_encoder(ckpt)
    pad = hf.config.pad_token_id or 0
    seqs = _seqs(pad)
    ids, mask = _padded(seqs, pad)
    types = None
    if kind == "bert":
        types = torch.zeros_like(ids)
        types[:, 2:] = 1   # exercise token types
    with torch.inference_mode():
        kw = {"token_type_ids": types} if types is not None else {}
        ref = hf(input_ids=ids, attention_mask=mask, **kw)
        flat = torch.tensor([t for s in seqs for t in s])
        pos = torch.cat([torch.arange(n) for n in LENS])
        flat_types = None if types is None else torch.cat([types[i, :n] for i, n in enumerate(LENS)])
        got = ours(flat, pos, flat_types, VarlenMetadata.build(LENS))
    if head == "":
        states = ref.last_hidden_state
        mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(got, mean, atol=2e-5, rtol=1e-4)
    elif head == "classify":
        torch.testing.assert_close(got, ref.logits, atol=2e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(got, ref.logits[mask.bool()], atol=2e-5, rtol=1e-4)


def test_engine_classify_and_tokens(tmp_path):
    """The engine's probabilities (softmax of HF's logits) and labels (id2label), batched under a tiny budget."""
    hf, path = _save(tmp_path, "bert", "classify")
    engine = EncoderEngine(path, max_num_batched_tokens=10)
    seqs = _seqs(0)
    out = engine.classify(seqs)
    with torch.inference_mode():
        for s, o in zip(seqs, out):
            probs = torch.softmax(hf(input_ids=torch.tensor([s])).logits[0], -1)
            torch.testing.assert_close(torch.tensor(o.outputs.probs), probs, atol=1e-5, rtol=1e-4)
            assert o.outputs.label == hf.config.id2label[int(probs.argmax())] and o.outputs.num_classes == 3
    hf, path = _save(tmp_path, "mpnet", "token-classify")
    tok = EncoderEngine(path)
    (res,) = tok.token_classify([seqs[2]])
    with torch.inference_mode():
        labels = hf(input_ids=torch.tensor([seqs[2]])).logits[0].argmax(-1).tolist()
    assert res.outputs.labels == [hf.config.id2label[i] for i in labels] and len(res.outputs.probs) == LENS[2]
    assert res.outputs.tokens == [f"w{t}" for t in seqs[2]]
    (text,) = engine.classify(["w7 w8 w9"])    # text through the WordPiece vocab: [CLS] w7 w8 w9 [SEP]
    assert text.prompt_token_ids == [2, 7, 8, 9, 3]


def test_batches_respect_budget(tmp_path):
    _, path = _save(tmp_path, "bert", "")
    engine = EncoderEngine(path, max_num_batched_tokens=12, max_num_seqs=2)
    inputs = [EncoderInput(list(range(1, n + 1))) for n in [5, 20, 3, 7, 7, 1]]
    batches = engine.batches(inputs)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 2 and (len(b) == 1 or sum(len(inputs[i].token_ids) for i in b) <= 12)
    whole = torch.stack(engine.run(inputs, "embed"))
    alone = torch.stack([engine.run([x], "embed")[0] for x in inputs])
    torch.testing.assert_close(whole, alone, atol=1e-5, rtol=1e-4)


def test_varlen_attention_matches_per_sequence_reference():
    torch.manual_seed(0)
    lens = [4, 9, 1, 9]
    q, k, v = (torch.randn(sum(lens), 2, 8) for _ in range(3))
    meta = VarlenMetadata.build(lens)
    torch.testing.assert_close(varlen_attention(torch.stack([q, k, v], 1), meta), reference_attention(q, k, v, lens))
    bias = torch.randn(2, 9, 9)
    torch.testing.assert_close(varlen_attention(torch.stack([q, k, v], 1), meta, bias), reference_attention(q, k, v, lens, bias))
    many = torch.randint(1, 90, (150,), generator=torch.Generator().manual_seed(3)).tolist()   # several groups
    meta = VarlenMetadata.build(many)
    assert len(meta.groups) > 2 and sorted(meta.scatter.tolist()) == meta.scatter.unique().tolist()
    q, k, v = (torch.randn(sum(many), 2, 8) for _ in range(3))
    bias = torch.randn(2, 90, 90)
    torch.testing.assert_close(varlen_attention(torch.stack([q, k, v], 1), meta, bias), reference_attention(q, k, v, many, bias))
    same = [3, 3]
    q2, k2, v2 = q[:6], k[:6], v[:6]
    torch.testing.assert_close(varlen_attention(torch.stack([q2, k2, v2], 1), VarlenMetadata.build(same)),
                               reference_attention(q2, k2, v2, same))


def test_relative_buckets_match_hf():
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    rel = torch.arange(-300, 300)[None, :]
    torch.testing.assert_close(relative_position_bucket(rel, 32), MPNetEncoder.relative_position_bucket(rel, 32))


def test_matryoshka_dimensions(tmp_path):
    """dimensions: refused (400 upstream) unless config.json declares Matryoshka sizes; then truncated and
    renormalized."""
    from scaleinfer.errors import RequestError

    _, path = _save(tmp_path, "bert", "")
    engine = EncoderEngine(path)
    with pytest.raises(RequestError, match="matryoshka"):
        engine.embed([[1, 2, 3]], dimensions=16)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    cfg["matryoshka_dimensions"] = [16, 32]
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f)
    engine = EncoderEngine(path)
    full = torch.tensor(engine.embed([[1, 2, 3]])[0].outputs.embedding)
    short = torch.tensor(engine.embed([[1, 2, 3]], dimensions=16)[0].outputs.embedding)
    torch.testing.assert_close(short, torch.nn.functional.normalize(full[:16], dim=0))
    with pytest.raises(RequestError, match="not one this model"):
        engine.embed([[1, 2, 3]], dimensions=8)


def test_legacy_hub_name_from_the_offline_cache(tmp_path, offline_hf_cache):
    """`LLM("distilbert-base-uncased-finetuned-sst-2-english")`: a hub name without an organisation (the hub's
    legacy repos) is looked up in the HF cache (then the hub); here a tiny DistilBERT classifier cached under
    that name classifies as its directory does. A name in neither is a one-line not-found error listing the
    catalog. A subprocess: huggingface_hub reads HF_HOME when imported."""
    import subprocess
    import sys

    _, path = _save(tmp_path, "distilbert", "classify")
    env = offline_hf_cache("distilbert-base-uncased-finetuned-sst-2-english", path)
    code = ("import json, sys; from scaleinfer import LLM; "
            "o = LLM(sys.argv[1]).classify(['w7 w8 w9', 'w10'])\n"
            "print(json.dumps([[r.outputs.label, r.outputs.probs] for r in o]))")
    run = lambda model: subprocess.run([sys.executable, "-c", code, model], env=env, capture_output=True,
                                       text=True, timeout=300)
    by_name, by_dir = run("distilbert-base-uncased-finetuned-sst-2-english"), run(path)
    assert by_name.returncode == 0, by_name.stderr[-2000:]
    assert by_dir.returncode == 0 and json.loads(by_name.stdout) == json.loads(by_dir.stdout)
    missing = subprocess.run([sys.executable, "-m", "scaleinfer", "generate", "hi", "--model", "no-such-legacy-name"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "model not found: 'no-such-legacy-name'" in missing.stderr and "smollm2-135m-instruct" in missing.stderr
