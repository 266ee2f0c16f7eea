"""The local server's data directory: runs, checkpoints and their metadata.

Layout (everything lives under ``data_dir``; nothing a client sends can name a path outside it)::

    {data_dir}/runs/{run_id}/weights/{name}            -> ../.store/{name}.{uid}   (symlink)
    {data_dir}/runs/{run_id}/sampler_weights/{name}    -> ../.store/{name}.{uid}   (symlink)
    {data_dir}/runs/{run_id}/.store/{name}.{uid}/      the files + checkpoint.json

A checkpoint is written into a fresh directory under ``.store``; its ``checkpoint.json`` is
written last; then a symlink is renamed over ``weights/<name>`` (``os.replace``), so saving a
name again replaces it atomically: a reader sees the old checkpoint or the new one, never a
mixture and never nothing. The superseded directory is deleted afterwards.

Names and ids are validated by :func:`validate_name` (1-128 characters of ``[A-Za-z0-9._-]``,
not starting with ``.``) and ``bt://loops:<run_id>/weights|sampler_weights/<name>`` URIs by
:func:`parse_checkpoint_uri`; every rejection is an :class:`InvalidRequest` naming the field.

``load_state`` may also read a checkpoint from outside the data directory
(:meth:`Storage.load_source`): ``file:///abs/dir`` or an absolute directory path in the server's
on-disk format. Such a directory is only ever read, never written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec

from .._codec import encode as _encode
from ..types import Checkpoint, LoraAdapterConfig
from .backend import ADAPTER_FILES, InvalidRequest, has_optimizer_state

__all__ = [
    "CHECKPOINT_METADATA",
    "CheckpointKind",
    "CheckpointRecord",
    "CheckpointRef",
    "LoadSource",
    "Storage",
    "parse_checkpoint_uri",
    "validate_name",
]

logger = logging.getLogger("loops_async.server")

CheckpointKind = Literal["weights", "sampler_weights"]
"""The two kinds of checkpoint: trainer state, or an adapter published for sampling."""

CHECKPOINT_METADATA = "checkpoint.json"
"""The metadata file inside every checkpoint directory."""

_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_URI_RE = re.compile(
    r"bt://loops:(?P<run_id>[^/]*)/(?P<kind>weights|sampler_weights)/(?P<name>[^/]*)"
)
_KINDS: tuple[CheckpointKind, ...] = ("weights", "sampler_weights")
_TARGETS: dict[str, str] = {"weights": "trainer", "sampler_weights": "sampler"}
_TYPES: dict[str, str] = {"weights": "training", "sampler_weights": "sampler"}
_STORE = ".store"


def validate_name(value: object, field: str = "name") -> str:
    """Return ``value`` if it is a valid checkpoint name or id (1-128 characters of
    ``[A-Za-z0-9._-]``, not starting with ``.``); else raise :class:`InvalidRequest`."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 160 else "(too long)"
        raise InvalidRequest(
            f"{field}: invalid name {shown}: use 1-128 characters of A-Z a-z 0-9 . _ - "
            "not starting with '.'"
        )
    return value


@dataclass(frozen=True)
class CheckpointRef:
    """A parsed, validated checkpoint address (no I/O was done to build it)."""

    run_id: str
    kind: CheckpointKind
    name: str

    @property
    def uri(self) -> str:
        """``bt://loops:<run_id>/<kind>/<name>``."""
        return f"bt://loops:{self.run_id}/{self.kind}/{self.name}"

    @property
    def target(self) -> str:
        """``"trainer"`` for ``weights``, ``"sampler"`` for ``sampler_weights``."""
        return _TARGETS[self.kind]


def parse_checkpoint_uri(uri: object, field: str = "path") -> CheckpointRef:
    """Parse ``bt://loops:<run_id>/weights/<name>`` or ``.../sampler_weights/<name>``.

    Strict: no other scheme, no extra segments, run id and name must pass
    :func:`validate_name`. Raises :class:`InvalidRequest` naming ``field``.
    """
    if not isinstance(uri, str):
        raise InvalidRequest(f"{field}: expected a bt://loops: checkpoint URI, got {uri!r}")
    match = _URI_RE.fullmatch(uri)
    if match is None:
        shown = uri if len(uri) <= 300 else uri[:300] + "..."
        raise InvalidRequest(
            f"{field}: {shown!r} is not a checkpoint URI of this server "
            "(bt://loops:<run_id>/weights/<name> or bt://loops:<run_id>/sampler_weights/<name>)"
        )
    run_id = validate_name(match["run_id"], f"{field} (run id)")
    name = validate_name(match["name"], f"{field} (checkpoint name)")
    kind: CheckpointKind = "weights" if match["kind"] == "weights" else "sampler_weights"
    return CheckpointRef(run_id=run_id, kind=kind, name=name)


class CheckpointRecord(Checkpoint, kw_only=True):
    """What ``checkpoint.json`` holds: the listed :class:`~loops_async.types.Checkpoint`
    fields plus server-side bookkeeping."""

    expires_at: float | None = None
    """Unix time after which the checkpoint is gone (``ttl_seconds``), or None to keep."""
    with_optimizer: bool = False
    """Whether the directory holds optimizer state (``weights`` checkpoints)."""
    step: int = 0
    """The trainer's step counter (policy version) when it was saved."""

    def public(self) -> Checkpoint:
        """The record as the control plane lists it."""
        return Checkpoint(**{f: getattr(self, f) for f in Checkpoint.__struct_fields__})

    def expired(self, now: float | None = None) -> bool:
        """Whether ``ttl_seconds`` has run out."""
        return (
            self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at
        )


_record_decoder = msgspec.json.Decoder(CheckpointRecord)

_MAX_CONFIG_BYTES = 1 << 20
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class LoadSource:
    """A checkpoint directory ``load_state`` reads: one of this server's checkpoints, or a
    local directory in the server's on-disk format (see :meth:`Storage.load_source`)."""

    directory: Path
    uri: str
    """How the client named it (a ``bt://`` URI, a ``file://`` URI or a path), for messages."""
    base_model: str | None
    """The base model it was trained on, when known."""
    lora_rank: int | None
    """Its adapter rank, when known."""
    with_optimizer: bool
    """Whether it holds optimizer state (``load_state_with_optimizer`` needs it)."""


def _external_source(directory: Path, shown: str, field: str) -> LoadSource:
    """Check a local checkpoint directory (read only): PEFT adapter files and a readable
    ``adapter_config.json``; :class:`InvalidRequest` naming ``field`` otherwise."""
    fmt = (
        "a checkpoint directory in this server's format holds the PEFT adapter files "
        f"({', '.join(ADAPTER_FILES)}), plus the optimizer state for load_state_with_optimizer"
    )
    try:
        if not directory.is_dir():
            raise InvalidRequest(f"{field}: {shown} is not an existing directory ({fmt})")
        for name in ADAPTER_FILES:
            if not (directory / name).is_file():
                raise InvalidRequest(f"{field}: {shown} holds no {name} ({fmt})")
        config_file = directory / ADAPTER_FILES[0]
        if config_file.stat().st_size > _MAX_CONFIG_BYTES:
            raise InvalidRequest(f"{field}: {shown}/{config_file.name} is too large")
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or UTF-8, NUL in the path
        if isinstance(exc, InvalidRequest):
            raise
        raise InvalidRequest(f"{field}: cannot read the checkpoint in {shown}: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidRequest(f"{field}: {shown}/{ADAPTER_FILES[0]} is not a JSON object")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidRequest(
            f"{field}: {shown}/{ADAPTER_FILES[0]} has no valid LoRA rank 'r' (got {rank!r})"
        )
    base = config.get("base_model_name_or_path")
    return LoadSource(
        directory=directory,
        uri=shown,
        base_model=base if isinstance(base, str) and base else None,
        lora_rank=rank,
        with_optimizer=has_optimizer_state(directory),
    )


class Storage:
    """The data directory. Methods do blocking file I/O: call them from a worker thread for
    anything large (writing a checkpoint); small metadata reads are fine on the event loop."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.root: Path = data_dir.resolve()
        """The resolved data directory."""
        self.runs_dir: Path = self.root / "runs"
        """``{data_dir}/runs``."""
        self.runs_dir.mkdir(exist_ok=True)

    def __repr__(self) -> str:
        return f"Storage({str(self.root)!r})"

    # ----------------------------------------------------------------------- paths

    def _inside(self, path: Path, field: str) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise InvalidRequest(f"{field}: resolves outside the server's data directory")
        return resolved

    def run_dir(self, run_id: str) -> Path:
        """``{data_dir}/runs/{run_id}`` (validated; may not exist)."""
        validate_name(run_id, "run_id")
        return self.runs_dir / run_id

    def create_run(self, run_id: str) -> Path:
        """Create the directory of a new run and return it."""
        path = self.run_dir(run_id)
        (path / _STORE).mkdir(parents=True, exist_ok=True)
        return path

    def link_path(self, ref: CheckpointRef) -> Path:
        """``{data_dir}/runs/{run_id}/{kind}/{name}`` (the name clients see; a symlink)."""
        return self.run_dir(ref.run_id) / ref.kind / ref.name

    # ----------------------------------------------------------------------- write

    def write_checkpoint(
        self,
        ref: CheckpointRef,
        write: Callable[[Path], None],
        *,
        base_model: str,
        lora_rank: int,
        step: int,
        with_optimizer: bool,
        ttl_seconds: int | None = None,
    ) -> CheckpointRecord:
        """Save a checkpoint atomically.

        ``write(directory)`` fills a fresh, empty directory (the backend's ``save_state``); then
        ``checkpoint.json`` is added and the directory is swapped in under ``ref``'s name. On
        any error the partial directory is removed and the old checkpoint (if any) is kept.
        """
        run_dir = self.create_run(ref.run_id)
        store = run_dir / _STORE
        fresh = store / f"{ref.name}.{uuid.uuid4().hex[:12]}"
        fresh.mkdir()
        try:
            write(fresh)
            size = sum(p.stat().st_size for p in fresh.rglob("*") if p.is_file())
            now = time.time()
            record = CheckpointRecord(
                id=f"ckpt-{uuid.uuid4().hex}",
                run_id=ref.run_id,
                checkpoint_id=ref.name,
                checkpoint_type=_TYPES[ref.kind],
                created_at=datetime.fromtimestamp(now, UTC).isoformat(),
                base_model=base_model,
                lora_adapter_config=LoraAdapterConfig(r=lora_rank),
                size_bytes=size,
                sync_status="synced",
                target=ref.target,
                expires_at=None if ttl_seconds is None else now + ttl_seconds,
                with_optimizer=with_optimizer,
                step=step,
            )
            (fresh / CHECKPOINT_METADATA).write_bytes(_encode(record))
            link = self.link_path(ref)
            link.parent.mkdir(exist_ok=True)
            old = self._target_of(link)
            tmp_link = link.parent / f".{ref.name}.{uuid.uuid4().hex[:12]}.tmp"
            os.symlink(Path("..") / _STORE / fresh.name, tmp_link, target_is_directory=True)
            os.replace(tmp_link, link)
        except BaseException:
            shutil.rmtree(fresh, ignore_errors=True)
            raise
        if old is not None and old != fresh:
            shutil.rmtree(old, ignore_errors=True)
        return record

    def _target_of(self, link: Path) -> Path | None:
        """The directory a checkpoint link points to, if it is one of ours."""
        if not link.is_symlink():
            return None
        target = (link.parent / os.readlink(link)).resolve()
        if target.parent != (link.parent.parent / _STORE).resolve() or not target.is_dir():
            return None
        return target

    # ----------------------------------------------------------------------- read

    def lookup(self, ref: CheckpointRef) -> tuple[Path, CheckpointRecord] | None:
        """The real directory and metadata of ``ref``, or None if it does not exist or expired
        (an expired checkpoint is deleted)."""
        link = self.link_path(ref)
        directory = self._target_of(link)
        if directory is None:
            return None
        directory = self._inside(directory, "path")
        try:
            record = _record_decoder.decode((directory / CHECKPOINT_METADATA).read_bytes())
        except (OSError, msgspec.DecodeError):
            return None
        if record.expired():
            self._delete(link, directory)
            return None
        return directory, record

    def resolve(
        self, uri: object, field: str = "path"
    ) -> tuple[CheckpointRef, Path, CheckpointRecord]:
        """Parse ``uri`` and find its checkpoint; :class:`InvalidRequest` naming ``field`` if it
        is malformed or does not exist in this data directory."""
        ref = parse_checkpoint_uri(uri, field)
        found = self.lookup(ref)
        if found is None:
            raise InvalidRequest(
                f"{field}: checkpoint {ref.uri} does not exist on this server (unknown run or "
                "name, expired, or saved under another data directory)"
            )
        return ref, found[0], found[1]

    def load_source(self, path: object, field: str = "path") -> LoadSource:
        """What a ``load_state`` ``path`` names: ``bt://loops:<run>/weights|sampler_weights/
        <name>`` (a checkpoint of this server), ``file:///abs/dir`` or an absolute directory
        path (a checkpoint in the server's on-disk format, e.g. one downloaded with
        ``/files``; only read, never written). ``s3://`` and anything else are an
        :class:`InvalidRequest` naming ``field``."""
        if not isinstance(path, str) or not path:
            raise InvalidRequest(f"{field}: expected a checkpoint path, got {path!r}")
        shown = path if len(path) <= 300 else path[:300] + "..."
        if path.startswith("bt://"):
            ref, directory, record = self.resolve(path, field)
            config = record.lora_adapter_config
            return LoadSource(
                directory=directory,
                uri=ref.uri,
                base_model=record.base_model,
                lora_rank=None if config is None else config.r,
                with_optimizer=record.with_optimizer,
            )
        if path.lower().startswith("s3://"):
            raise InvalidRequest(
                f"{field}: s3:// checkpoints are not available on the local server; download it "
                f"and pass a local path (got {shown!r})"
            )
        if path.lower().startswith("file:"):
            parts = urllib.parse.urlsplit(path)
            if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
                raise InvalidRequest(
                    f"{field}: {shown!r} is not a local file URI (file:///absolute/directory)"
                )
            local = urllib.parse.unquote(parts.path)
        elif _SCHEME_RE.match(path):
            raise InvalidRequest(
                f"{field}: {shown!r}: unsupported scheme; the local server loads "
                "bt://loops:<run_id>/weights/<name>, file:///absolute/directory or an absolute "
                "directory path"
            )
        else:
            local = path
        if not os.path.isabs(local):
            raise InvalidRequest(
                f"{field}: {shown!r} is neither a checkpoint URI of this server "
                "(bt://loops:<run_id>/weights/<name>) nor an absolute directory path"
            )
        return _external_source(Path(local), shown, field)

    def list_run(self, run_id: str) -> list[CheckpointRecord]:
        """Every live checkpoint of a run (both kinds), oldest first. Unknown run: empty."""
        run_dir = self.run_dir(run_id)
        records: list[CheckpointRecord] = []
        for kind in _KINDS:
            folder = run_dir / kind
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                if _NAME_RE.fullmatch(entry.name) is None:
                    continue
                ref = CheckpointRef(run_id=run_id, kind=kind, name=entry.name)
                found = self.lookup(ref)
                if found is not None:
                    records.append(found[1])
        records.sort(key=lambda r: (r.created_at or "", r.target or "", r.checkpoint_id))
        return records

    def find(self, uri: object, field: str = "checkpoint_path") -> list[CheckpointRecord]:
        """The checkpoint a URI names, as a list of zero or one record."""
        ref = parse_checkpoint_uri(uri, field)
        found = self.lookup(ref)
        return [] if found is None else [found[1]]

    def find_by_id(self, checkpoint_id: str) -> tuple[CheckpointRef, Path, CheckpointRecord] | None:
        """The live checkpoint whose record ``id`` is ``checkpoint_id`` (a scan of the data
        directory), or None."""
        if _NAME_RE.fullmatch(checkpoint_id) is None or not self.runs_dir.is_dir():
            return None
        for run_dir in sorted(self.runs_dir.iterdir()):
            if _NAME_RE.fullmatch(run_dir.name) is None or run_dir.is_symlink():
                continue
            for kind in _KINDS:
                folder = run_dir / kind
                if not folder.is_dir():
                    continue
                for entry in sorted(folder.iterdir()):
                    if _NAME_RE.fullmatch(entry.name) is None:
                        continue
                    ref = CheckpointRef(run_id=run_dir.name, kind=kind, name=entry.name)
                    found = self.lookup(ref)
                    if found is not None and found[1].id == checkpoint_id:
                        return ref, found[0], found[1]
        return None

    @staticmethod
    def checkpoint_files(directory: Path) -> list[tuple[str, Path]]:
        """``(relative name, path)`` of every regular file of a checkpoint directory, sorted by
        name; the server's own ``checkpoint.json`` and symlinks are left out."""
        out: list[tuple[str, Path]] = []
        for path in directory.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            rel = path.relative_to(directory).as_posix()
            if rel != CHECKPOINT_METADATA:
                out.append((rel, path))
        out.sort(key=lambda item: item[0])
        return out

    # ----------------------------------------------------------------------- cleanup

    def _delete(self, link: Path, directory: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        shutil.rmtree(directory, ignore_errors=True)

    def sweep(self) -> int:
        """Delete partial writes left by a crash (store directories no link points to) and
        expired checkpoints. Returns how many directories were removed.

        Call it only while nothing writes to the data directory (at server start-up): a
        checkpoint being written is not linked yet and would be removed."""
        removed = 0
        if not self.runs_dir.is_dir():
            return 0
        for run_dir in self.runs_dir.iterdir():
            store = run_dir / _STORE
            if not store.is_dir() or run_dir.is_symlink():
                continue
            live: set[Path] = set()
            for kind in _KINDS:
                folder = run_dir / kind
                if not folder.is_dir():
                    continue
                for link in folder.iterdir():
                    # Our temporary links are ".<name>.<uid>.tmp"; a checkpoint name never starts
                    # with "." (but may end in ".tmp").
                    if link.name.startswith(".") and link.name.endswith(".tmp"):
                        with contextlib.suppress(OSError):
                            link.unlink()
                        continue
                    target = self._target_of(link)
                    if target is None:
                        continue
                    if _NAME_RE.fullmatch(link.name) is not None:
                        ref = CheckpointRef(run_id=run_dir.name, kind=kind, name=link.name)
                        if self.lookup(ref) is None:
                            removed += 1
                            continue
                    live.add(target)
            for entry in store.iterdir():
                if entry.resolve() not in live:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
        if removed:
            logger.info("storage sweep removed %d stale checkpoint directories", removed)
        return removed
