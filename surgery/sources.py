"""Where a model source's files are: every `model NAME = "SOURCE"` form resolved to one local
Hugging Face directory (config.json + safetensors + tokenizer), which the loader then reads.

- ``hf:DIR``: a Hugging Face directory, as saved by ``save_pretrained`` (sharded too).
- ``hf:FILE.safetensors``: one weights file, with the config.json (and tokenizer) beside it. Several
  checkpoints of one model often share a directory (``step-100.safetensors``, ...); this picks one.
- ``hf:ORG/NAME`` (optionally ``@REVISION``): a hub model from the local Hugging Face cache
  (``HF_HUB_CACHE``). Nothing is ever downloaded: the machine may be offline, and a surgery run
  must not depend on the network.
- ``gguf:FILE.gguf``: a llama.cpp file, dequantized by transformers and cached once as an HF
  directory (the zoo's SmolLM2 comes this way too).

Single files and GGUF files become directories under the cache (``surgery.paths.cache_root``):
symlinks for a safetensors file (nothing copied), a one-time conversion for GGUF. Their keys hold
the file's size and mtime, so a changed file is never served stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from surgery.deploy.tokenizer_files import TOKENIZER_FILES
from surgery.diagnostics import error
from surgery.paths import cache_root

HF_HELP = ("`hf:` takes a directory holding config.json and *.safetensors, one .safetensors file "
           "with a config.json beside it, or a hub id ORG/NAME that is in the local Hugging Face "
           "cache")
# A hub id: ORG/NAME with the characters the hub allows, and an optional @revision.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
# Files a directory view links besides the weights: what transformers reads to build the model
# and its tokenizer.
_SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def _file_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists()


def hf_source_dir(path: str) -> Path:
    """The directory an ``hf:`` source names, resolving single files and hub ids."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise error("E0600", f"`{path}` is a file but not a .safetensors file", help=HF_HELP)
        return safetensors_view(p)
    if p.exists() or not _HUB_ID.match(path):
        if not p.exists():
            raise error("E0602", f"model directory `{path}` does not exist", help=HF_HELP)
        return p
    return hub_cache_dir(path)


def safetensors_view(file: Path) -> Path:
    """A directory holding (links to) ``file`` as model.safetensors, with its neighbours'
    config and tokenizer files."""
    parent = file.parent
    if not (parent / "config.json").exists():
        raise error("E0602", f"`{file}` has no config.json beside it",
                    help="a single .safetensors file needs the model's config.json in the same "
                         "directory (it says which architecture the tensors belong to)")
    view = cache_root() / "views" / f"{file.stem}-{_file_key(file)}"
    if (view / "model.safetensors").exists():
        return view
    from surgery.atomic import atomic_dir

    view.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(view) as tmp:
        (tmp / "model.safetensors").symlink_to(file.resolve())
        for name in _SIDE_FILES:
            if (parent / name).exists():
                (tmp / name).symlink_to((parent / name).resolve())
        (tmp / "surgery-source.json").write_text(json.dumps({"file": str(file.resolve())}))
    return view


def hub_cache_dir(repo: str) -> Path:
    """The snapshot directory of hub model ``ORG/NAME[@REVISION]`` in the local HF cache."""
    repo_id, _, revision = repo.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # transformers depends on it, so this is a broken install
        raise error("E0600", "`huggingface_hub` is not installed, so hub ids cannot be resolved",
                    help="pip install huggingface_hub, or give the model's directory") from None
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        found = snapshot_download(repo_id, revision=revision or None, cache_dir=cache,
                                  local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: not downloaded yet
        from huggingface_hub import constants

        where = cache or constants.HF_HUB_CACHE
        raise error("E0602", f"`{repo}` is neither a local directory nor in the Hugging Face "
                             f"cache ({where})",
                    help=f"download it first (`hf download {repo_id}`) on a machine with network "
                         "access; surgery never downloads. Or give a directory path") from None
    return Path(found)


def gguf_source_dir(path: str) -> Path:
    """An HF directory converted (once) from the GGUF file ``path``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise error("E0602", f"GGUF file `{path}` does not exist",
                    help="`gguf:` takes the path of a llama.cpp .gguf file")
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise error("E0603", f"`{path}` is not a GGUF file (its first bytes are not `GGUF`)",
                        help="the file is corrupt or of another format")
    target = cache_root() / "gguf" / f"{file.stem}-{_file_key(file)}"
    if not (target / "model.safetensors").exists():
        convert_gguf(file, target)
    return target


def convert_gguf(file: Path, target: Path, config: dict | None = None) -> None:
    """Dequantize ``file`` with transformers and write it as an HF directory at ``target``
    (atomically). ``config`` replaces the config transformers derives from the GGUF metadata."""
    import torch
    from safetensors.torch import save_file

    from surgery.atomic import atomic_dir
    from surgery.fileio import quiet, sha256_file

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with quiet():
            tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
            model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                         dtype=torch.float32)
    except Exception as e:  # an architecture or tensor type transformers cannot read
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise error("E0600", f"transformers cannot load the GGUF file `{file}`: {first}",
                    help="transformers reads GGUF files of the architectures and tensor types "
                         "it lists in its GGUF docs; convert others with llama.cpp first"
                    ) from None
    if config is None:
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config.pop("_model_name_or_path", None)
    state = model.state_dict()
    if config.get("tie_word_embeddings", True):
        state.pop("lm_head.weight", None)  # the tied copy: transformers re-ties on load
    state = {k: v.contiguous() for k, v in state.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        st = file.stat()
        (tmp / "surgery-source.json").write_text(json.dumps(
            {"gguf": file.name, "size": st.st_size, "sha256": sha256_file(file)}, indent=2))


def source_files(directory: Path) -> list[Path] | None:
    """The original input files behind a view or conversion directory (hashed into the
    manifest instead of the links), or None for an ordinary directory."""
    meta = directory / "surgery-source.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    if "file" in info:
        return [Path(info["file"])]
    return None
