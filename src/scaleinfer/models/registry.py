"""The model families: one entry each, holding everything the readers, the loader and the tokenizer need.

Adding a family is its model file plus one `Family` entry here: its class, its HF config.json reader
(models/hf_config.py), its GGUF metadata reader and tensor-name map (models/gguf_config.py), how its
checkpoint's projections fill fused modules, and how its GGUF vocabulary is spelled. weights/ (the
readers and the generic loader) and engine/loading.py look families up here; models never import weights.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError
import scaleinfer.models.gguf_config as gguf
import scaleinfer.models.hf_config as hf
from scaleinfer.models.bart import BartForConditionalGeneration, read_bart_config, read_marian_config
from scaleinfer.models.gemma3 import Gemma3ForCausalLM
from scaleinfer.models.gguf_config import GGUFMetadata
from scaleinfer.models.llama import LlamaForCausalLM
from scaleinfer.models.qwen2 import Qwen2ForCausalLM
from scaleinfer.models.whisper import WhisperForConditionalGeneration
from scaleinfer.models.t5 import T5ForConditionalGeneration, read_t5_config

LLAMA_PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
"""Checkpoint projection -> (fused module, shard): Q/K/V and gate/up are one matmul each in our models."""


@dataclass(frozen=True)
class Family:
    name: str
    """ModelConfig.architecture, e.g. "llama"."""
    model_class: type
    hf_architectures: tuple[str, ...]
    """config.json `architectures` entries that load as this family."""
    read_hf_config: Callable[[dict, str], ModelConfig]
    """(config.json as a dict, its path) -> ModelConfig."""
    gguf_architecture: str
    """The GGUF `general.architecture` of this family."""
    read_gguf_config: Callable[[GGUFMetadata], ModelConfig]
    gguf_layer_names: Mapping[str, str]
    """GGUF per-layer tensor name (after `blk.N.`) -> HF name (after `model.layers.N.`)."""
    gguf_permuted_qk: bool
    """Whether llama.cpp's converter permuted the Q/K rows (interleaved RoPE pairs; weights/gguf.py undoes it)."""
    gguf_norm_plus_one: bool
    """Whether llama.cpp stored the norm weights as w + 1 (weights/gguf.py subtracts the 1 back)."""
    packed: Mapping[str, tuple[str, int]]
    """Checkpoint projection -> (fused module, shard)."""
    norm_offset: float = 0.0
    """The model's norms hold checkpoint weight + norm_offset (Gemma: checkpoints store zero-centred w, the
    model's RMSNorm multiplies by 1 + w, so the loader folds the 1 in once)."""
    checkpoint_prefixes: tuple[tuple[str, str], ...] = ()
    """(prefix, replacement) renames of checkpoint tensor names, e.g. a multimodal wrapper's language model."""
    skipped_prefixes: tuple[str, ...] = ()
    """Checkpoint tensors (by name prefix) the model does not use, e.g. a vision tower."""
    tokenizer_kind: str = "llama"
    """How a SentencePiece GGUF vocabulary is spelled (tokenizer.py): "llama" or "gemma"."""

    def checkpoint_name(self, name: str) -> str | None:
        """The HF decoder name of a checkpoint tensor (after this family's renames), or None to skip it."""
        if name.startswith(self.skipped_prefixes) or name.endswith("rotary_emb.inv_freq"):
            return None
        for prefix, replacement in self.checkpoint_prefixes:
            if name.startswith(prefix):
                return replacement + name.removeprefix(prefix)
        return name


FAMILIES = (
    Family("llama", LlamaForCausalLM, ("LlamaForCausalLM", "MistralForCausalLM"), hf.read_llama,
           "llama", gguf.read_llama_cpp, gguf.LAYER_NAMES, gguf_permuted_qk=True,
           gguf_norm_plus_one=False, packed=LLAMA_PACKED),
    Family("qwen2", Qwen2ForCausalLM, ("Qwen2ForCausalLM",), hf.read_qwen2,
           "qwen2", gguf.read_llama_cpp, gguf.LAYER_NAMES, gguf_permuted_qk=False,
           gguf_norm_plus_one=False, packed=LLAMA_PACKED),
    Family("gemma3", Gemma3ForCausalLM, ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
           hf.read_gemma3, "gemma3", gguf.read_gemma3, gguf.GEMMA3_LAYER_NAMES,
           gguf_permuted_qk=False, gguf_norm_plus_one=True, packed=LLAMA_PACKED, norm_offset=1.0,
           checkpoint_prefixes=(("model.language_model.", "model."), ("language_model.model.", "model."),
                                ("language_model.lm_head.", "lm_head.")),
           skipped_prefixes=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                             "model.multi_modal_projector."),
           tokenizer_kind="gemma"),
    Family("whisper", WhisperForConditionalGeneration, (), None, "", None, {}, gguf_permuted_qk=False,
           gguf_norm_plus_one=False, packed={}),   # CTranslate2 model.bin (weights/ct2_whisper.py)
    # Text-to-text encoder-decoders (HF safetensors directories; module names are the checkpoints').
    Family("t5", T5ForConditionalGeneration, ("T5ForConditionalGeneration",), read_t5_config, "", None, {},
           gguf_permuted_qk=False, gguf_norm_plus_one=False, packed={},
           skipped_prefixes=("encoder.embed_tokens.", "decoder.embed_tokens.")),
    Family("bart", BartForConditionalGeneration, ("BartForConditionalGeneration",), read_bart_config, "", None,
           {}, gguf_permuted_qk=False, gguf_norm_plus_one=False, packed={},
           skipped_prefixes=("model.encoder.embed_tokens.", "model.decoder.embed_tokens.")),
    Family("marian", BartForConditionalGeneration, ("MarianMTModel",), read_marian_config, "", None, {},
           gguf_permuted_qk=False, gguf_norm_plus_one=False, packed={},
           skipped_prefixes=("model.encoder.embed_tokens.", "model.decoder.embed_tokens.",
                             "model.encoder.embed_positions.", "model.decoder.embed_positions.")),
)
_BY_NAME = {f.name: f for f in FAMILIES}
_BY_HF = {a: f for f in FAMILIES for a in f.hf_architectures}
_BY_GGUF = {f.gguf_architecture: f for f in FAMILIES if f.gguf_architecture}   # "": no GGUF form (encoder-decoders)


def family(name: str) -> Family:
    """The family of ModelConfig.architecture `name`."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedModelError(f"architecture {name!r} is not supported; supported: "
                                    f"{', '.join(sorted(_BY_NAME))}") from None


def hf_family(architectures: list[str], cfg_file: str) -> Family:
    """The family of a config.json's `architectures` list (the first entry we know)."""
    found = next((_BY_HF[a] for a in architectures if a in _BY_HF), None)
    if found is None:
        raise UnsupportedModelError(f"architecture {architectures} in {cfg_file} is not supported; supported: "
                                    f"{', '.join(sorted(_BY_HF))}")
    return found


def gguf_family(arch: object, path: str) -> Family:
    """The family of a GGUF's `general.architecture`."""
    found = _BY_GGUF.get(arch) if isinstance(arch, str) else None
    if found is None:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} in {path} is not supported; supported: "
                                    f"{', '.join(_BY_GGUF)}")
    return found


def gguf_architectures() -> tuple[str, ...]:
    return tuple(_BY_GGUF)
