"""Validation of an `hf:` directory's config.json before transformers sees it.

transformers meets a bad config with a TypeError or KeyError deep in model code, or, for a config
that names custom code (``auto_map``), by asking on the terminal whether to run it. Here every such
config is refused with a located error instead, the same way in `check`, `plan` and `apply`:

- E0603: not UTF-8, empty, not JSON, not a JSON object, `model_type` missing or not a string,
  `architectures` not a list of names, a field whose JSON type differs from transformers' default
  for it (`"hidden_size": "big"`, `"num_hidden_layers": 2.5`, `"tie_word_embeddings": "yes"`);
- E0606: a `model_type` or architecture this transformers version does not know;
- E0605: remote code (`auto_map`), refused unless ``trust_remote_code`` (`--trust-remote-code`).
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.diagnostics import Code, did_you_mean, error

MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few KB; a huge one is not a config


def _read(path: Path) -> object:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise error(Code.E0603, f"`{path}` is {size / 1e6:.0f} MB, too large for a config.json")
        data = path.read_bytes()
    except OSError as e:
        raise error(Code.E0603, f"cannot read `{path}`: {e.strerror}") from None
    if not data.strip():
        raise error(Code.E0603, f"`{path}` is empty", help="the checkpoint's config.json is corrupt")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(Code.E0603, f"`{path}` is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x})",
                    help="the checkpoint's config.json is corrupt") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        where = f" ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise error(Code.E0603, f"`{path}` is not valid JSON{where}",
                    help="the checkpoint's config.json is corrupt") from None


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            int: "an integer", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _fits(default, value, key: str) -> bool:
    """Whether a JSON value has the type of transformers' default for the field."""
    if value is None or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        if key.endswith("_token_id") and isinstance(value, list):
            return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def _known_model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def validate_config(path: Path, *, trust_remote_code: bool = False) -> dict:
    """The parsed config.json at ``path``, or a SurgeryError saying what is wrong with it."""
    config = _read(path)
    if not isinstance(config, dict):
        raise error(Code.E0603, f"`{path}` holds {_json_type(config)}, not a JSON object",
                    help="a transformers config.json is an object such as "
                         '{"model_type": "llama", ...}')
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        raise error(Code.E0603, f"`architectures` in `{path}` must be a list of class names, got "
                             f"{_json_type(archs)}")
    if config.get("auto_map") is not None:
        if not trust_remote_code:
            raise error(Code.E0605, f"`{path}` needs Python code shipped with the checkpoint "
                                 "(`auto_map`), which is not run by default",
                        help="pass --trust-remote-code if you trust this directory's .py files "
                             "(Python API: trust_remote_code=True)")
        return config  # its own code defines model_type and the architecture
    model_type = config.get("model_type")
    if model_type is None:
        raise error(Code.E0603, f"`{path}` has no `model_type`", help="is this a transformers model?")
    if not isinstance(model_type, str):
        raise error(Code.E0603, f"`model_type` in `{path}` must be a string, got {_json_type(model_type)}")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise error(Code.E0606, f"unknown model_type `{model_type}` in `{path}`",
                    help=did_you_mean(model_type, _known_model_types(),
                                      listing="this transformers knows")
                    or "this transformers version does not know the architecture")
    try:
        defaults = CONFIG_MAPPING[model_type]().to_dict()
    except Exception:  # a config class that needs arguments: skip the type comparison
        defaults = {}
    for key, value in config.items():
        if key in defaults and not _fits(defaults[key], value, key):
            raise error(Code.E0603, f"`{key}` in `{path}` is {_json_type(value)} "
                                 f"({json.dumps(value)[:40]}), expected {_json_type(defaults[key])}",
                        help="the checkpoint's config.json is corrupt or hand-edited")
    if archs:
        import transformers

        if not any(hasattr(transformers, a) for a in archs):
            raise error(Code.E0606, f"unknown architecture {', '.join(f'`{a}`' for a in archs)} in "
                                 f"`{path}`",
                        help="this transformers version has no such model class; check "
                             "`architectures`")
    return config
