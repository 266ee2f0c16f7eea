"""Splitting large ``forward`` / ``forward_backward`` batches into several operations, and
merging their results back into one.

Each datum is encoded to JSON once (``msgspec.Raw``); chunk sizes are measured on those bytes,
and a chunk's body splices the pre-encoded datums in, so nothing is encoded twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ._codec import encode
from ._operation import APIFuture
from .errors import ValidationError
from .types import Datum, ForwardBackwardOutput

__all__ = ["MAX_REQUEST_BYTES", "MergedForwardFuture", "encode_datums", "merge_outputs", "split"]

MAX_REQUEST_BYTES = 24 * 1024 * 1024
"""Largest request body the client sends for one operation (the hosted service's limit is
about 24 MiB); larger batches are split."""

_ENVELOPE_BYTES = 4096
"""Room left in each chunk for the fields around ``data`` (seq_id, run_id, loss_fn_config...)."""


def encode_datums(datums: Sequence[Datum]) -> list[msgspec.Raw]:
    """Each datum's JSON, encoded once."""
    return [msgspec.Raw(encode(datum)) for datum in datums]


def split(sizes: Sequence[int], *, limit: int, pairs: bool) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` index ranges whose encoded sizes fit ``limit`` each.

    With ``pairs`` (dpo: chosen/rejected rows), a chunk never ends between rows ``2i`` and
    ``2i + 1``. A unit that cannot fit alone raises :class:`ValidationError`.
    """
    budget = limit - _ENVELOPE_BYTES
    step = 2 if pairs else 1
    chunks: list[tuple[int, int]] = []
    start, used = 0, 0
    for unit in range(0, len(sizes), step):
        end = min(unit + step, len(sizes))
        size = sum(sizes[unit:end]) + (end - unit)  # + the commas between datums
        if size > budget:
            what = f"data[{unit}]" if step == 1 else f"data[{unit}:{end}] (a dpo pair)"
            raise ValidationError(
                f"{what}: encodes to {size / 2**20:.1f} MiB, more than one request may carry "
                f"({limit / 2**20:.0f} MiB); shorten it"
            )
        if used + size > budget and unit > start:
            chunks.append((start, unit))
            start, used = unit, 0
        used += size
    chunks.append((start, len(sizes)))
    return chunks


def merge_outputs(
    outputs: Sequence[ForwardBackwardOutput], counts: Sequence[int]
) -> ForwardBackwardOutput:
    """One output from the outputs of consecutive chunks: ``loss_fn_outputs`` concatenated in
    order, ``loss`` and every metric averaged weighted by each chunk's datum count."""
    total = sum(counts)
    loss = sum(o.loss * n for o, n in zip(outputs, counts, strict=True)) / total
    metrics: dict[str, float] = {}
    weights: dict[str, int] = {}
    for out, n in zip(outputs, counts, strict=True):
        for name, value in out.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + value * n
            weights[name] = weights.get(name, 0) + n
    return ForwardBackwardOutput(
        loss=loss,
        loss_fn_output_type=outputs[0].loss_fn_output_type,
        loss_fn_outputs=[item for out in outputs for item in out.loss_fn_outputs],
        metrics={name: metrics[name] / weights[name] for name in metrics},
    )


class MergedForwardFuture(APIFuture[ForwardBackwardOutput]):
    """The result of a batch that was split into several operations (see :class:`APIFuture`).

    ``operation_ids`` lists the chunks' operations in order.
    """

    def __init__(
        self, futures: Sequence[APIFuture[ForwardBackwardOutput]], counts: Sequence[int]
    ) -> None:
        super().__init__()
        self._futures = list(futures)
        self._counts = list(counts)
        self.operation_ids = [f.operation_id for f in self._futures]
        """The operation ids of the chunks, in order."""
        self.operation_id = self.operation_ids[0] if self.operation_ids else ""

    def _describe(self) -> str:
        return f"{len(self._futures)} chunked operations"

    async def _fetch(self) -> ForwardBackwardOutput:
        outputs = [await future.result_async() for future in self._futures]
        return merge_outputs(outputs, self._counts)
