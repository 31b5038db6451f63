"""Checkpoints without a tokenizer.json (issue 16): a Marian directory as HF's MarianTokenizer saves it
(source.spm, target.spm, vocab.json) and a T5 directory with only spiece.model. SentencePiece models are
trained here, offline, on data/ (English and Chinese); our ids and texts must equal HF's, and
`scaleinfer translate` on a random tiny MarianMTModel must print what HF's generate decodes."""
from __future__ import annotations

import io
import json
import os
import pathlib
import shutil

import pytest

spm = pytest.importorskip("sentencepiece")
T = pytest.importorskip("transformers")
import torch  # noqa: E402

from scaleinfer.cli import main  # noqa: E402
from scaleinfer.tokenizer import Tokenizer  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[2] / "data"
TEXTS = ["Hello world, how are you?", "To be, or not to be: that is the question.", "你好，世界", "贾宝玉和林黛玉",
         "I love 🍕 pizza 🎉!", "mixed 中文 and English, 123", "  two  spaces </s> then <unk> x", "",
         "ÅÉ ﬁ ① résumé", ">>cmn_Hans<< Good morning", ">>yue<< 早晨 friend"]
ENGINE = ["--quantization", "none", "--max-model-len", "64", "--kv-cache-memory", "4MiB", "--kv-cache-dtype",
          "float32", "--max-tokens", "8"]


def _train(lines: list[str], path: str, size: int, **kw) -> str:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=size,
                                   minloglevel=2, **kw)
    pathlib.Path(path).write_bytes(model.getvalue())
    return path


def _english() -> list[str]:
    return [s for s in (DATA / "shakespeare-en.txt").read_text().splitlines() if s.strip()][:2000]


def _chinese() -> list[str]:
    return [s for s in (DATA / "hongloumeng-zh.txt").read_text().splitlines() if s.strip()][:80]


def _randomize(model):
    with torch.no_grad():   # weights large enough that outputs vary with the input (HF's init is ~0.02)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0, 0.5)


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    work = tmp_path_factory.mktemp("spm")
    src = _train(_english(), str(work / "source.spm"), 300)
    tgt = _train(_chinese(), str(work / "target.spm"), 1400, character_coverage=0.98, hard_vocab_limit=False)
    s, t = spm.SentencePieceProcessor(model_file=src), spm.SentencePieceProcessor(model_file=tgt)
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in [s.id_to_piece(i) for i in range(s.get_piece_size())] + \
                 [t.id_to_piece(i) for i in range(t.get_piece_size())] + [">>cmn_Hans<<", ">>yue<<"]:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    (work / "vocab.json").write_text(json.dumps(vocab))
    path = str(work / "marian")
    tok = T.MarianTokenizer(src, tgt, str(work / "vocab.json"), source_lang="en", target_lang="zh")
    tok.save_pretrained(path)
    cfg = T.MarianConfig(vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=48,
                         max_position_embeddings=64, pad_token_id=vocab["<pad>"], eos_token_id=0,
                         decoder_start_token_id=vocab["<pad>"], scale_embedding=True)
    torch.manual_seed(0)
    model = T.MarianMTModel(cfg).eval()
    _randomize(model)
    model.generation_config.bad_words_ids = [[vocab["<pad>"]]]   # opus-mt never generates <pad>
    model.save_pretrained(path)
    assert not os.path.exists(os.path.join(path, "tokenizer.json"))
    return path


def test_marian_ids_and_texts_equal_hf(marian):
    ours, ref = Tokenizer.from_hf_dir(marian), T.MarianTokenizer.from_pretrained(marian)
    for text in TEXTS:
        ids = ref(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == ids[:-1], text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert ours.eos_token_ids == (ref.eos_token_id,) and ours.vocab_size == ref.vocab_size
    assert ours.all_special_ids == frozenset(ref.all_special_ids)
    assert ">>yue<<" in ours.language_codes
    chinese = ref(text_target="贾宝玉和林黛玉").input_ids   # target pieces decode through the shared vocabulary
    assert ours.decode(chinese) == ref.decode(chinese, skip_special_tokens=True)


@pytest.mark.parametrize("beams", [1, 4])
def test_translate_marian_equals_hf_generate(marian, beams, capsys):
    hf = T.MarianMTModel.from_pretrained(marian, dtype=torch.float32).eval()
    hf.generation_config.forced_eos_token_id = None   # our engine has no forced-EOS rule
    ref_tok = T.MarianTokenizer.from_pretrained(marian)
    texts = ["Hello world, how are you?", "To be, or not to be.", "I love 🍕 pizza", "mixed 中文 and English"]
    want = []
    for text in texts:
        out = hf.generate(torch.tensor([ref_tok(text).input_ids]), do_sample=False, num_beams=beams,
                          max_new_tokens=8, length_penalty=1.0)
        want.append(ref_tok.decode(out[0], skip_special_tokens=True).strip())
    assert main(["translate", *texts, "--model", marian, "--num-beams", str(beams), *ENGINE]) == 0
    assert capsys.readouterr().out.splitlines() == want


def test_t5_spiece_only_equals_hf(tmp_path, capsys):
    path = tmp_path / "t5"
    path.mkdir()
    _train(_english(), str(path / "spiece.model"), 300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    cfg = T.T5Config(vocab_size=400, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
                     pad_token_id=0, eos_token_id=1)
    torch.manual_seed(1)
    model = T.T5ForConditionalGeneration(cfg).eval()
    _randomize(model)
    model.save_pretrained(str(path))
    ours, ref = Tokenizer.from_hf_dir(str(path)), T.AutoTokenizer.from_pretrained(str(path))
    assert not os.path.exists(path / "tokenizer.json")
    for text in TEXTS + ["fill <extra_id_0> the <extra_id_7> gaps"]:
        ids = ref(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.vocab_size == len(ref)
    text = "translate English to German: Hello world"
    out = model.generate(torch.tensor([ref(text).input_ids]), do_sample=False, num_beams=1, max_new_tokens=8)
    want = ref.decode(out[0], skip_special_tokens=True).strip()
    assert main(["translate", "Hello world", "--model", str(path), "--num-beams", "1", *ENGINE]) == 0
    assert capsys.readouterr().out.splitlines() == [want]


def test_missing_tokenizer_is_one_line_error(marian, tmp_path):
    from scaleinfer.errors import WeightLoadError

    bare = tmp_path / "bare"
    shutil.copytree(marian, bare)
    for f in ("source.spm", "target.spm", "vocab.json"):
        (bare / f).unlink()
    with pytest.raises(WeightLoadError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(str(bare))
    (bare / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(WeightLoadError, match="cannot read the SentencePiece model"):
        Tokenizer.from_hf_dir(str(bare))


def test_hub_id_from_offline_cache(marian, offline_hf_cache):
    """`--model org/name` with HF_HUB_OFFLINE: the snapshot in the HF cache is used; a repo not in the cache
    is a one-line error (exit 2). A subprocess, since huggingface_hub reads HF_HOME when imported."""
    import subprocess
    import sys

    env = offline_hf_cache("Helsinki-NLP/opus-mt-tiny-en-zh", marian)
    args = [sys.executable, "-m", "scaleinfer", "translate", "Hello world", "--num-beams", "1", *ENGINE]
    got = subprocess.run([*args, "--model", "Helsinki-NLP/opus-mt-tiny-en-zh"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    local = subprocess.run([*args, "--model", marian], env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0 and got.stdout == local.stdout and got.stdout.strip()
    missing = subprocess.run([*args, "--model", "Helsinki-NLP/opus-mt-not-cached"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "unreachable" in missing.stderr


class NotWeights:
    pass


def test_pytorch_bin_only_checkpoint(marian, tmp_path, capsys):
    """opus-mt repos hold pytorch_model.bin (every key, tied and positional ones included), not safetensors."""
    from scaleinfer.errors import WeightLoadError
    from scaleinfer.weights.loader import open_checkpoint

    path = tmp_path / "bin"
    shutil.copytree(marian, path)
    (path / "model.safetensors").unlink()
    torch.save(T.MarianMTModel.from_pretrained(marian).state_dict(), path / "pytorch_model.bin")
    args = ["translate", "Hello world", "I love 🍕 pizza", "--num-beams", "4", *ENGINE]
    assert main([*args, "--model", marian]) == 0
    want = capsys.readouterr().out
    assert main([*args, "--model", str(path)]) == 0
    assert capsys.readouterr().out == want
    torch.save({"x": NotWeights()}, path / "pytorch_model.bin")   # a pickled object: refused, never run
    with pytest.raises(WeightLoadError, match="cannot read .* as a PyTorch state dict"):
        open_checkpoint(str(path))


def test_hub_download_takes_bin_when_no_safetensors(monkeypatch, tmp_path):
    import huggingface_hub
    from types import SimpleNamespace

    from scaleinfer.weights import loader

    calls = []

    def snapshot_download(repo_id, allow_patterns, local_files_only=False, **kw):
        if local_files_only:
            raise FileNotFoundError("not cached")
        calls.append(allow_patterns)
        return str(tmp_path)

    files = {"org/old": ["config.json", "pytorch_model.bin", "source.spm"], "org/new": ["model.safetensors"]}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, timeout=None: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=f) for f in files[repo_id]]))
    assert loader._download("org/old") == str(tmp_path) and loader._download("org/new") == str(tmp_path)
    assert "pytorch_model*.bin" in calls[0] and "pytorch_model*.bin" not in calls[1]
    assert {"*.spm", "spiece.model", "*.safetensors", "*.json"} <= set(calls[0])


def test_marian_separate_vocabs_equal_hf(marian, tmp_path):
    """separate_vocabs (tokenizer_config): inputs numbered by vocab.json, outputs read through
    target_vocab.json and the target model, as HF does."""
    path = tmp_path / "sep"
    shutil.copytree(marian, path)
    t = spm.SentencePieceProcessor(model_file=str(path / "target.spm"))
    target = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for piece in (t.id_to_piece(i) for i in range(t.get_piece_size())):
        target.setdefault(piece, len(target))
    (path / "target_vocab.json").write_text(json.dumps(target))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "separate_vocabs": True,
                                                            "target_vocab_file": "target_vocab.json"}))
    ref = T.MarianTokenizer(str(path / "source.spm"), str(path / "target.spm"), str(path / "vocab.json"),
                            target_vocab_file=str(path / "target_vocab.json"), separate_vocabs=True)
    ours = Tokenizer.from_hf_dir(str(path))
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids, text
    for text in ("贾宝玉和林黛玉", "你好，世界", "mixed 中文"):
        ids = ref(text_target=text).input_ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), text


def test_bart_vocab_and_merges_only_equals_hf(tmp_path, capsys):
    """A BART dir with vocab.json + merges.txt (byte-level BPE, trained here) and no tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer

    path = tmp_path / "bart"
    path.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_english() + _chinese()[:20], vocab_size=500,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(str(path))
    cfg = T.BartConfig(vocab_size=bpe.get_vocab_size(), d_model=32, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=48,
                       max_position_embeddings=64)
    torch.manual_seed(2)
    model = T.BartForConditionalGeneration(cfg).eval()
    _randomize(model)
    model.save_pretrained(str(path))
    ours, ref = Tokenizer.from_hf_dir(str(path)), T.AutoTokenizer.from_pretrained(str(path))
    assert not os.path.exists(path / "tokenizer.json")
    for text in TEXTS + [" lead space <mask> x</s>"]:
        ids = ref(text).input_ids
        assert ours.encode(text) == ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), text
    text = "To be, or not to be: 你好 🍕"
    out = model.generate(torch.tensor([ref(text).input_ids]), do_sample=False, num_beams=1, max_new_tokens=8)
    want = ref.decode(out[0], skip_special_tokens=True).strip()
    assert main(["summarize", text, "--model", str(path), "--num-beams", "1", *ENGINE]) == 0
    assert capsys.readouterr().out.splitlines() == [want]


def test_translate_target_lang_token(marian, capsys):
    """--target-lang on a multilingual Marian model puts its >>xxx<< token first; an unknown one is refused."""
    args = ["translate", "Good morning", "--num-beams", "1", "--model", marian, *ENGINE]
    assert main([*args, "--prefix", ">>yue<< "]) == 0
    want = capsys.readouterr().out
    assert main([*args, "--target-lang", "yue"]) == 0
    assert capsys.readouterr().out == want
    assert main([*args, "--target-lang", "xx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cmn_Hans, yue" in err


def test_marian_tokenizer_saved_by_quantize_reloads(marian, tmp_path):
    from scaleinfer.weights.quantized import save_tokenizer

    ours = Tokenizer.from_hf_dir(marian)
    save_tokenizer(ours, str(tmp_path))
    again = Tokenizer.from_hf_dir(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) and again.decode(ours.encode(text)) == ours.decode(
            ours.encode(text)), text
    assert again.eos_token_ids == ours.eos_token_ids
