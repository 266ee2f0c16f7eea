"""Decoding of ``forward`` / ``forward_backward`` bodies into numpy-backed tensors.

Decoded the plain way (``msgspec`` into :class:`~loops_async._wire.ForwardBackwardRequest`),
every tensor value and token id of a body becomes a Python object: a 63 MB body turns into over
1 GB of floats, ints and list slots, which the allocator then keeps. Here the body is decoded
into mirror types whose tensor ``data`` and chunk ``tokens`` are :class:`msgspec.Raw` (views of
the body, no objects per element); each raw JSON array is then turned into one numpy array,
wrapped as :class:`~loops_async.types.ArrayData` (``len``, indexing, ``to_numpy()`` work as on
a list):

- token lists and integer tensors of integers: parsed in C by :func:`numpy.fromstring`, no
  Python object per element; kept as int32 when every value fits (else int64);
- float tensors (and integer tensors holding ``null``, fractions or exponents): one tensor's
  elements are decoded by msgspec and converted at once (``np.asarray(values, float64)``, what
  the validators do with the plain decoder's list), then dropped; the array is float32 for
  ``float32`` / ``bfloat16`` and float64 otherwise. (``numpy.fromstring`` parses floats
  identically but about 4x slower than this: 180 ns a value.)

The values are those the plain decoder and the validators compute (``null`` is NaN), and
:mod:`~loops_async.server.validation` reads both alike. What the fast paths do not cover keeps
the plain decoder's behaviour and error messages:

- a ``bool`` tensor, or data numpy cannot hold (a 400-digit integer): a list, as before;
- a token list holding an integer beyond int64: a list, as before;
- any body the mirror types or a per-tensor decode reject: the whole body is decoded again by
  the plain decoder, whose :class:`~loops_async.server.backend.InvalidRequest` names the first
  offending field as it always did (invalid bodies only).

Pure and thread-safe: the server calls :func:`decode_request` on a worker thread for a large
body (:class:`~loops_async.server.http.BodyGate`).
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import msgspec
import numpy as np
import numpy.typing as npt

from .._wire import ForwardBackwardRequest, OpRequest
from ..types import (
    ArrayData,
    Datum,
    EncodedTextChunk,
    ExternalRef,
    ImageAssetPointerChunk,
    ImageChunk,
    ModelInput,
    TensorData,
)
from .http import _decode

__all__ = ["decode_forward_request", "decode_request"]

T = TypeVar("T")

# --------------------------------------------------------------------------- mirror types
# Field for field the wire types of loops_async.types / _wire (tests/server/test_decode.py
# checks that they stay so), with the element arrays left raw.


class _RawTensor(msgspec.Struct, kw_only=True):
    data: msgspec.Raw
    dtype: str
    shape: list[int] | None = None


class _RawTextChunk(msgspec.Struct, tag="encoded_text", tag_field="type", kw_only=True):
    tokens: msgspec.Raw


class _RawModelInput(msgspec.Struct, kw_only=True):
    chunks: list[_RawTextChunk | ImageChunk | ImageAssetPointerChunk] = msgspec.field(
        default_factory=list
    )


class _RawDatum(msgspec.Struct, kw_only=True):
    model_input: _RawModelInput
    loss_fn_inputs: dict[str, _RawTensor] = msgspec.field(default_factory=dict)
    routed_experts_ref: ExternalRef | None = None


class _RawForwardBackwardRequest(OpRequest, kw_only=True):
    data: list[_RawDatum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = None
    top_k_logprobs: int = 0


_RAW_DECODER = msgspec.json.Decoder(_RawForwardBackwardRequest)
_VALUES_DECODER = msgspec.json.Decoder(list[bool | int | float | None])
_TOKENS_DECODER = msgspec.json.Decoder(list[int])


class _Fallback(Exception):
    """Internal: the body is not valid for the plain decoder; let it say why."""


# --------------------------------------------------------------------------- raw arrays

_INT_BYTES = b"0123456789-, \t\n\r"
"""What a flat JSON array of integers holds: digits, minus signs, commas and whitespace."""
_INT64 = np.iinfo(np.int64)
_INT32 = np.iinfo(np.int32)


def _parse_ints(raw: msgspec.Raw) -> npt.NDArray[np.int64] | None:
    """The integers of the flat JSON array ``raw``, parsed in C without a Python object per
    element; None when ``raw`` holds anything else (``null``, fractions, exponents, other
    JSON) or an integer beyond int64, for the caller's slower path.

    ``raw`` is valid JSON (msgspec checked it), so once every byte is a digit, a minus sign,
    a comma or whitespace, it is exactly a comma-separated list of JSON integers, which
    :func:`numpy.fromstring` parses (saturating at the int64 bounds, hence the check)."""
    text = bytes(raw).strip(b" \t\n\r")
    if len(text) < 2 or text[0] != 0x5B or text[-1] != 0x5D:  # [ ... ]
        return None
    inner = text[1:-1]
    del text
    if not inner.strip(b" \t\n\r"):
        return np.empty(0, dtype=np.int64)
    if inner.translate(None, _INT_BYTES):
        return None
    try:
        ints = np.fromstring(inner, dtype=np.int64, sep=",")
    except ValueError:  # cannot happen for such text; the slower path decides
        return None
    if ints.shape[0] != inner.count(b",") + 1:
        return None
    if ints.size and (int(ints.max()) == _INT64.max or int(ints.min()) == _INT64.min):
        return None  # saturated: beyond int64 (or at its very bound), msgspec's call
    return ints


def _narrow(ints: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
    """``ints`` as int32 when every value fits (token ids and targets do): half the memory."""
    if ints.size == 0 or (int(ints.min()) >= _INT32.min and int(ints.max()) <= _INT32.max):
        return ints.astype(np.int32)
    return ints


def _values(raw: msgspec.Raw) -> list[bool | int | float | None]:
    """The elements of a tensor's ``data`` as the plain decoder reads them."""
    try:
        return _VALUES_DECODER.decode(raw)
    except (msgspec.MsgspecError, RecursionError):
        raise _Fallback from None


def _tensor_data(raw: _RawTensor) -> TensorData:
    """``TensorData`` with ``ArrayData``: int32/int64 for integer tensors of integers, float32
    for float32 and bfloat16, float64 otherwise (the values the validators compute from the
    plain decoder's list, ``null`` as NaN); a list, as before, for ``bool`` tensors and data
    numpy cannot hold."""
    dtype = raw.dtype
    ints = _parse_ints(raw.data) if dtype in ("int64", "int32") else None
    if ints is not None:
        return TensorData(data=ArrayData(_narrow(ints)), dtype=dtype, shape=raw.shape)
    # One tensor's elements become Python objects for a moment (msgspec parses floats several
    # times faster than numpy's text parser), then one array; nothing per element is kept.
    values = _values(raw.data)
    if dtype == "bool":
        return TensorData(data=values, dtype=dtype, shape=raw.shape)
    try:
        floats = np.asarray(values, dtype=np.float64)  # as validation._as_float64 reads it
    except (TypeError, ValueError, OverflowError):  # a 400-digit integer: validation says so
        return TensorData(data=values, dtype=dtype, shape=raw.shape)
    del values
    array: npt.NDArray[Any] = floats
    if dtype in ("float32", "bfloat16"):
        with np.errstate(over="ignore"):  # beyond float32: inf, as the validators read it
            array = floats.astype(np.float32)
    elif dtype in ("int64", "int32"):
        array = _as_ints(floats)
    return TensorData(data=ArrayData(array), dtype=dtype, shape=raw.shape)


def _as_ints(floats: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
    """int64 when every value is an integer that fits; else the float64 values (NaN,
    fractions, beyond int64), which validation rejects as it did the list."""
    if not bool((np.abs(floats) < 2.0**63).all()):  # False for NaN
        return floats
    ints = floats.astype(np.int64)
    return ints if bool((ints == floats).all()) else floats


def _tokens(raw: msgspec.Raw) -> ArrayData | list[int]:
    ints = _parse_ints(raw)
    if ints is not None:
        return ArrayData(_narrow(ints))
    try:  # beyond int64, or not integers: the plain decoder's list (or its error)
        return _TOKENS_DECODER.decode(raw)
    except (msgspec.MsgspecError, RecursionError):
        raise _Fallback from None


def _datum(raw: _RawDatum) -> Datum:
    chunks = [
        EncodedTextChunk(tokens=cast(Any, _tokens(c.tokens))) if isinstance(c, _RawTextChunk) else c
        for c in raw.model_input.chunks
    ]
    return Datum(
        model_input=ModelInput(chunks=chunks),
        loss_fn_inputs={name: _tensor_data(t) for name, t in raw.loss_fn_inputs.items()},
        routed_experts_ref=raw.routed_experts_ref,
    )


# --------------------------------------------------------------------------- entry points


def decode_forward_request(body: bytes) -> ForwardBackwardRequest:
    """Decode a ``forward`` / ``forward_backward`` body with numpy-backed tensors and token
    lists (see the module docstring); :class:`~loops_async.server.backend.InvalidRequest`
    naming the field, exactly as :func:`~loops_async.server.http._decode` does, when the body
    does not fit."""
    try:
        raw = _RAW_DECODER.decode(body)
        fields = {
            f: getattr(raw, f) for f in ForwardBackwardRequest.__struct_fields__ if f != "data"
        }
        data = [_datum(d) for d in raw.data]
        del raw
        return ForwardBackwardRequest(data=data, **fields)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError, _Fallback):
        pass
    # Invalid (the mirror types let nothing through that the wire type rejects, and reject
    # nothing it takes): the plain decoder says why, in its words.
    return _decode(ForwardBackwardRequest, body)


def decode_request(typ: type[T], body: bytes) -> T:
    """Decode an operation body into ``typ``: :func:`decode_forward_request` for
    :class:`~loops_async._wire.ForwardBackwardRequest`, the plain decoder otherwise."""
    if typ is ForwardBackwardRequest:
        return cast(T, decode_forward_request(body))
    return _decode(typ, body)
