"""JSON codecs: one module-level encoder and one cached decoder per type.

Tensors are encoded from flat Python lists (``ndarray.tolist()`` runs in C) by msgspec, so
building and encoding a request never loops over elements in Python. NaN encodes as ``null``.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import msgspec
import numpy as np

from .types import ArrayData

T = TypeVar("T")

__all__ = ["decode", "decoder_for", "encode"]


try:  # formats numeric arrays straight from their buffer, without making Python objects
    import orjson

    _ORJSON_NUMPY = orjson.OPT_SERIALIZE_NUMPY

    def _array_json(array: np.ndarray[Any, Any]) -> Any:
        if array.dtype.kind in "fiub" and array.dtype.itemsize <= 8:
            return msgspec.Raw(orjson.dumps(np.ascontiguousarray(array), option=_ORJSON_NUMPY))
        return array.tolist()

except ImportError:  # pragma: no cover - exercised where orjson is absent

    def _array_json(array: np.ndarray[Any, Any]) -> Any:
        return array.tolist()


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, ArrayData):
        return _array_json(obj.array)
    # Values users may leave inside TensorData.data or token lists.
    if isinstance(obj, np.ndarray):
        return _array_json(obj.reshape(-1)) if obj.ndim == 1 else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__} as JSON")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def encode(obj: object) -> bytes:
    """Encode a wire object as JSON bytes."""
    return _encoder.encode(obj)


def decoder_for(type_: Any) -> msgspec.json.Decoder[Any]:
    """The shared, lenient decoder for ``type_`` (unknown fields are ignored)."""
    dec = _decoders.get(type_)
    if dec is None:
        dec = msgspec.json.Decoder(type_, strict=False)
        _decoders[type_] = dec
    return dec


def decode(data: bytes | str, type_: type[T]) -> T:
    """Decode JSON ``data`` as ``type_``."""
    return cast("T", decoder_for(type_).decode(data))
