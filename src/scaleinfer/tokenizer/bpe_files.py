"""BART / RoBERTa-style directories with vocab.json + merges.txt and no tokenizer.json: the byte-level BPE
backend HF's RobertaTokenizer (which BART's tokenizer is) builds from those two files."""
from __future__ import annotations

import json
import os

from scaleinfer.errors import WeightLoadError


def is_bpe_dir(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))


def _token(cfg: dict, key: str, default: str) -> str:
    tok = cfg.get(key, default)
    return (tok.get("content") if isinstance(tok, dict) else tok) or default


def byte_bpe_backend(path: str, cfg: dict):
    """GPT-2 byte-level BPE over vocab.json / merges.txt, `<s> ... </s>` around the text (RobertaProcessing),
    <s> <pad> </s> <unk> <mask> (or tokenizer_config's spellings) matched whole as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    try:
        with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"cannot read the BPE vocabulary of {path} ({exc}); re-download the model") from None
    merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version") and " " in line]
    try:
        backend = Tokenizer(BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                fuse_unk=False))
    except Exception as exc:  # the Rust side: a merge of tokens not in the vocabulary
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightLoadError(f"{path}: vocab.json and merges.txt do not agree ({first})") from None
    add_prefix_space = bool(cfg.get("add_prefix_space", False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    names = [("bos_token", "<s>"), ("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
             ("mask_token", "<mask>")]
    specials = [_token(cfg, key, default) for key, default in names]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos, eos = specials[0], specials[2]
    if backend.token_to_id(bos) is not None and backend.token_to_id(eos) is not None:
        backend.post_processor = processors.RobertaProcessing((eos, backend.token_to_id(eos)),
                                                              (bos, backend.token_to_id(bos)), trim_offsets=True,
                                                              add_prefix_space=add_prefix_space)
    return backend
