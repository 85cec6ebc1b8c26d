"""Reading the files minift is given, with errors a user can act on.

Every file minift reads (a model directory's ``config.json`` and ``model.safetensors``, an
adapter, a checkpoint's ``state.json`` / ``optimizer.json`` / ``*.safetensors``, ``run.json``)
goes through these readers. A file that is missing, empty, truncated, not UTF-8, not JSON,
JSON of the wrong shape, not safetensors, or holds tensors of a dtype the reader cannot use
raises ``InputError``: one line that starts with the file's path and says what is wrong.
The CLI prints it and exits 2.

This module imports nothing of minift (and torch only when it reads tensors): every layer
may use it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad input (a file or a setting): reported as one line, exit code 2."""


class MissingFile(InputError, FileNotFoundError):
    """A file or directory that is not there; ``except FileNotFoundError`` catches it too."""


class MissingKey(InputError, KeyError):
    """A file lacks an entry (a tensor, a key) the reader needs; ``except KeyError`` catches it
    too, and unlike a KeyError its ``str`` is the message itself, unquoted."""
    __str__ = ValueError.__str__


def read_text(path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; InputError if it is missing, a directory or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} does not exist" if not path.exists() else f"{path}: {what} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {e.strerror}") from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` with one-line errors naming ``where``; NaN and infinities are refused
    (JSON has none, and no setting minift reads may be non-finite)."""
    def no_constant(name):
        raise InputError(f"{where}: {name} is not a valid JSON number")
    try:
        return json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None


def read_json(path, what: str = "JSON file", kind: type = dict) -> Any:
    """The JSON value in ``path``, which must be a ``kind`` (a dict unless told otherwise)."""
    value = parse_json(read_text(path, what), str(path))
    if not isinstance(value, kind):
        raise InputError(f"{path}: {what} must hold a JSON {_JSON_NAMES.get(kind, kind.__name__)}, "
                         f"got {_json_type(value)}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


def _json_type(value) -> str:
    if value is None:
        return "null"
    for t in (bool, int, float, str, list, dict):
        if isinstance(value, t):
            return f"a JSON {_JSON_NAMES[t]}"
    return type(value).__name__


def field(doc: dict, name: str, kind, path, *, default=..., finite: bool = True):
    """``doc[name]`` checked to be of ``kind`` (a type or a tuple of types; an int is a fine
    float, a bool is never a number); a missing field without a ``default`` is an error."""
    if name not in doc or doc[name] is None and default is not ...:
        if default is ...:
            raise InputError(f"{path}: field {name!r} is missing")
        return default
    value = doc[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(_is(value, k) for k in kinds)
    if not ok:
        words = " or ".join(_JSON_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds)
        raise InputError(f"{path}: field {name!r} must be {words}, got {_json_type(value)} {value!r:.60}")
    if finite and isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{path}: field {name!r} must be finite, got {value}")
    return value


def _is(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def read_safetensors(path, what: str = "weights file", *, floating: bool = True) -> dict:
    """The tensors of a safetensors file. InputError, naming ``path``, if it is missing, empty,
    truncated or not safetensors, or (with ``floating``, for weights) holds a tensor that is not
    floating point: an integer or boolean weight would be silently cast to float on copy."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: {what} does not exist")
    if path.stat().st_size < 8:
        raise InputError(f"{path}: {what} is empty or truncated (not a safetensors file)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: {what} is not a readable safetensors file ({detail})") from None
    if floating:
        check_floating(path, tensors)
    return tensors


def check_floating(path, tensors: dict, skip=lambda key: False) -> None:
    """InputError naming ``path`` and the first tensor (``skip(key)`` false) that is not floating
    point: copied into a float weight, an integer or boolean tensor would be silently cast."""
    for key, t in tensors.items():
        if not skip(key) and not t.is_floating_point():
            raise InputError(f"{path}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                             f"weights must be floating point (float32, float16 or bfloat16)")
