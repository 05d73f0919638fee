"""The messages between the API process and an engine in its own process (app/engine/process.py), as msgpack.

What crosses is the engine client's own data: SampleSpec and its guidance settings one way, the outputs of
app/engine/outputs.py the other (uint8 images as raw bytes). A dataclass or pydantic model travels as its class's
name and its fields, and only classes of this package are rebuilt on the other side; a numpy array as its dtype,
shape and bytes. Arrays come back as tuples (a frozen dataclass's fields stay hashable).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import msgpack
import numpy as np
from pydantic import BaseModel

_ARRAY, _OBJECT = 1, 2
_PACKAGE = "app."  # the only modules whose classes a message may name


def _default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, np.ndarray):
        head = msgpack.packb((obj.dtype.str, obj.shape))
        return msgpack.ExtType(_ARRAY, len(head).to_bytes(4, "little") + head + np.ascontiguousarray(obj).tobytes())
    cls = type(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    elif isinstance(obj, BaseModel):
        fields = {name: getattr(obj, name) for name in type(obj).model_fields}
    elif isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    else:
        raise TypeError(f"a {cls.__module__}.{cls.__qualname__} can't be sent to the engine process")
    return msgpack.ExtType(_OBJECT, encode((f"{cls.__module__}:{cls.__qualname__}", fields)))


def _class(name: str) -> Any:
    module, _, qualname = name.partition(":")
    if not module.startswith(_PACKAGE):
        raise ValueError(f"a message named the class {name!r}, outside {_PACKAGE}*")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (dataclasses.is_dataclass(cls) or (isinstance(cls, type) and issubclass(cls, BaseModel))):
        raise ValueError(f"a message named {name!r}, which is neither a dataclass nor a pydantic model")
    return cls


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _ARRAY:
        size = int.from_bytes(data[:4], "little")
        dtype, shape = msgpack.unpackb(data[4 : 4 + size])
        return np.frombuffer(data[4 + size :], dtype=np.dtype(dtype)).reshape(shape).copy()
    if code == _OBJECT:
        name, fields = decode(data)
        cls = _class(name)
        if issubclass(cls, BaseModel):
            return cls.model_validate(fields)
        return cls(**fields)
    return msgpack.ExtType(code, data)


def encode(message: Any) -> bytes:
    return msgpack.packb(message, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, use_list=False, raw=False, strict_map_key=False)
