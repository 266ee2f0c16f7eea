"""The local server's data directory: runs, checkpoints and their metadata.

Layout (everything lives under ``data_dir``; nothing a client sends can name a path outside it)::

    {data_dir}/runs/{run_id}/weights/{name}            -> ../.store/{name}.{uid}   (symlink)
    {data_dir}/runs/{run_id}/sampler_weights/{name}    -> ../.store/{name}.{uid}   (symlink)
    {data_dir}/runs/{run_id}/.store/{name}.{uid}/      a complete version: files + checkpoint.json
    {data_dir}/runs/{run_id}/.tmp/{name}.{uid}/        a save in progress (never acknowledged)
    {data_dir}/.trash/                                 versions and runs being deleted
    {data_dir}/quarantine/{run_id}/{kind}/{name}-{UTC time}/   set aside by the start-up sweep

Saving is crash safe. A checkpoint is written aside, into a fresh directory under ``.tmp``; every
file and directory in it is fsynced, ``checkpoint.json`` is written (and fsynced) last, and the
directory is renamed into ``.store``. Then a new symlink is renamed over ``{kind}/{name}``
(``os.replace``) and that directory is fsynced; only then is the superseded version deleted
(renamed into ``.trash`` first, so a reader sees the whole directory or nothing). Saving a name
again therefore replaces it atomically: a reader sees the old checkpoint or the new one, never a
mixture and never nothing, and a crash (even ``SIGKILL`` or a power cut) at any point leaves the
old or the new version loadable.

Reads never raise because a checkpoint vanished under them (an expiry or a deletion racing a
lookup): they answer "not found" (None), which the routes turn into a 404.

The start-up :meth:`Storage.sweep` empties ``.trash`` and ``.tmp``, deletes version directories
no name points to and expired checkpoints, and never deletes a named checkpoint whose metadata it
cannot read: that one is moved to ``quarantine`` with a WARNING.

Names and ids are validated by :func:`validate_name` (1-128 characters of ``[A-Za-z0-9._-]``,
not starting with ``.``) and ``bt://loops:<run_id>/weights|sampler_weights/<name>`` URIs by
:func:`parse_checkpoint_uri`; every rejection is an :class:`InvalidRequest` naming the field.

``load_state`` may also read a checkpoint from outside the data directory
(:meth:`Storage.load_source`): ``file:///abs/dir`` or an absolute directory path in the server's
on-disk format. Such a directory is only ever read, never written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import threading
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
    "QUARANTINE",
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
_TMP = ".tmp"
_TRASH = ".trash"
QUARANTINE = "quarantine"
"""The folder of ``data_dir`` where the start-up sweep sets aside unreadable checkpoints."""
_MAX_RECORD_BYTES = 1 << 20
"""A ``checkpoint.json`` larger than this is unreadable (the server writes a few hundred bytes)."""
_LOOKUP_ATTEMPTS = 5


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


class _UnreadableRecord(Exception):
    """A checkpoint directory whose ``checkpoint.json`` cannot be read (the message says why)."""


def _read_record(directory: Path) -> CheckpointRecord:
    """The metadata of a version directory; :class:`_UnreadableRecord` saying why not.

    Never follows a symlinked ``checkpoint.json``, never blocks on a FIFO, reads a bounded
    number of bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(directory / CHECKPOINT_METADATA, flags)
    except OSError as exc:
        raise _UnreadableRecord(f"cannot open {CHECKPOINT_METADATA}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _UnreadableRecord(f"{CHECKPOINT_METADATA} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(_MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise _UnreadableRecord(f"cannot read {CHECKPOINT_METADATA}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_RECORD_BYTES:
        raise _UnreadableRecord(f"{CHECKPOINT_METADATA} is larger than {_MAX_RECORD_BYTES} bytes")
    try:
        return _record_decoder.decode(data)
    except msgspec.DecodeError as exc:  # also msgspec.ValidationError
        raise _UnreadableRecord(f"{CHECKPOINT_METADATA} is not valid: {exc}") from None


def _record_or_none(directory: Path) -> CheckpointRecord | None:
    """:func:`_read_record`, or None when it cannot be read."""
    try:
        return _read_record(directory)
    except _UnreadableRecord:
        return None


def _listdir(folder: Path) -> list[str]:
    """The sorted entry names of ``folder``; empty when it is missing, not a directory, or
    vanishes (a racing deletion)."""
    try:
        return sorted(os.listdir(folder))
    except (OSError, ValueError):
        return []


def _is_real_dir(path: Path) -> bool:
    """Whether ``path`` is a directory and not a symlink (False if it vanished)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def _remove(path: Path) -> None:
    """Delete a file, a symlink or a whole directory tree (never following symlinks); what is
    already gone is fine."""
    if _is_real_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(path: Path) -> None:
    """Make the entries of a directory (creations, renames, removals) durable."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # a file system that cannot sync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _make_dir(path: Path) -> None:
    """``mkdir`` that makes a new directory's entry in its parent durable."""
    try:
        path.mkdir()
    except FileExistsError:
        return
    _fsync_dir(path.parent)


def _sync_tree(directory: Path) -> int:
    """fsync every regular file and every directory under ``directory`` (deepest first, the
    directory itself last); returns the total size of the regular files. Errors propagate: a
    write that cannot be made durable is not acknowledged."""

    def fail(exc: OSError) -> None:
        raise exc

    size = 0
    for root, _dirs, files in os.walk(directory, topdown=False, onerror=fail):
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            size += st.st_size
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))
    return size


def _write_synced(path: Path, data: bytes) -> None:
    """Write a new file and fsync it."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


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
    anything large (writing or deleting a checkpoint); small metadata reads are fine on the
    event loop.

    Thread safe within one process: the link swaps of saves, expiries and deletions are
    serialised by a lock (the files themselves are written outside it). One data directory
    belongs to one server process at a time."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.root: Path = data_dir.resolve()
        """The resolved data directory."""
        self.runs_dir: Path = self.root / "runs"
        """``{data_dir}/runs``."""
        self.runs_dir.mkdir(exist_ok=True)
        self.quarantine_dir: Path = self.root / QUARANTINE
        """``{data_dir}/quarantine``: checkpoints the start-up sweep could not read (created when
        first needed; never deleted by the server)."""
        self._swap_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Storage({str(self.root)!r})"

    # ----------------------------------------------------------------------- paths

    def _inside(self, path: Path, field: str) -> Path:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop
            raise InvalidRequest(f"{field}: cannot be resolved ({exc})") from None
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
        if not _is_real_dir(path):
            _make_dir(self.runs_dir)
            _make_dir(path)
        self._inside(path, "run_id")
        _make_dir(path / _STORE)
        return path

    def link_path(self, ref: CheckpointRef) -> Path:
        """``{data_dir}/runs/{run_id}/{kind}/{name}`` (the name clients see; a symlink).
        :class:`InvalidRequest` if the run id, kind or name is not valid."""
        if ref.kind not in _KINDS:
            raise InvalidRequest(f"kind: must be one of {', '.join(_KINDS)}, got {ref.kind!r}")
        validate_name(ref.name, "name")
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
        """Save a checkpoint atomically and durably.

        ``write(directory)`` fills a fresh, empty directory under the run's ``.tmp`` (the
        backend's ``save_state``); every file and directory in it is fsynced, ``checkpoint.json``
        is added (fsynced), the directory is renamed into ``.store`` and a symlink swapped in
        under ``ref``'s name; the parent directories are fsynced, and only then is the version
        it replaced deleted. When this returns the checkpoint survives a crash. On an error
        before the swap the partial directory is removed and the old checkpoint (if any) is
        kept.
        """
        link = self.link_path(ref)
        run_dir = self.create_run(ref.run_id)
        tmp_root = run_dir / _TMP
        _make_dir(tmp_root)
        uid = uuid.uuid4().hex[:12]
        version = f"{ref.name}.{uid}"
        written = tmp_root / version
        written.mkdir()
        swapped = False
        try:
            write(written)
            size = _sync_tree(written)
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
            _write_synced(written / CHECKPOINT_METADATA, _encode(record))
            _fsync_dir(written)
            final = run_dir / _STORE / version
            os.rename(written, final)
            written = final
            _fsync_dir(tmp_root)
            _fsync_dir(final.parent)
            _make_dir(link.parent)
            tmp_link = link.parent / f".{version}.tmp"
            with self._swap_lock:
                old = self._target_of(link)
                os.symlink(f"../{_STORE}/{version}", tmp_link, target_is_directory=True)
                try:
                    os.replace(tmp_link, link)
                except BaseException:
                    with contextlib.suppress(OSError):
                        tmp_link.unlink()
                    raise
                swapped = True
            _fsync_dir(link.parent)
        except BaseException:
            # Before the swap nothing refers to the new directory. After it, the new version is
            # the live one even if a sync failed: keep it (and the old one; the sweep decides).
            if not swapped:
                shutil.rmtree(written, ignore_errors=True)
            raise
        if old is not None and old != written:
            self._discard(old)
        return record

    @staticmethod
    def _link_target(link: Path) -> Path | None:
        """Where a checkpoint link points, if it reads ``../.store/<dir>`` (the form this server
        writes), whether or not ``<dir>`` exists; None when the link is missing, is no symlink
        or points elsewhere. Never raises."""
        try:
            value = os.readlink(link)
        except (OSError, ValueError):  # missing, not a symlink, a NUL in the name
            return None
        head, _, dirname = value.rpartition("/")
        if head != f"../{_STORE}" or dirname in ("", ".", "..") or dirname.startswith("."):
            return None
        return link.parent.parent / _STORE / dirname

    def _target_of(self, link: Path) -> Path | None:
        """The version directory a checkpoint link points to, if it is one of ours (see
        :meth:`_link_target`) and a real directory; None otherwise. Never raises."""
        target = self._link_target(link)
        return target if target is not None and _is_real_dir(target) else None

    # ----------------------------------------------------------------------- read

    def lookup(self, ref: CheckpointRef) -> tuple[Path, CheckpointRecord] | None:
        """The real directory and metadata of ``ref``, or None if it does not exist, expired (an
        expired checkpoint is deleted), vanished while being looked up (a racing deletion or
        expiry), or its metadata cannot be read. Never raises for a file system race; a save
        that replaces ``ref`` while it is looked up yields the old or the new version."""
        link = self.link_path(ref)
        for attempt in range(_LOOKUP_ATTEMPTS):
            target = self._link_target(link)
            if target is None:
                return None
            try:
                directory = self._inside(target, "path")
            except InvalidRequest:
                if self._link_target(link) != target:
                    continue  # it vanished while being resolved
                raise
            record = _record_or_none(directory)
            if self._link_target(link) != target and attempt + 1 < _LOOKUP_ATTEMPTS:
                continue  # replaced or deleted meanwhile: look again, for the current version
            if record is None:
                return None
            if record.expired():
                self._expire(link, target)
                return None
            return directory, record
        return None

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
            for entry in _listdir(run_dir / kind):
                if _NAME_RE.fullmatch(entry) is None:
                    continue
                found = self.lookup(CheckpointRef(run_id=run_id, kind=kind, name=entry))
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
        if _NAME_RE.fullmatch(checkpoint_id) is None:
            return None
        for run_id in _listdir(self.runs_dir):
            if _NAME_RE.fullmatch(run_id) is None or not _is_real_dir(self.runs_dir / run_id):
                continue
            for kind in _KINDS:
                for entry in _listdir(self.runs_dir / run_id / kind):
                    if _NAME_RE.fullmatch(entry) is None:
                        continue
                    ref = CheckpointRef(run_id=run_id, kind=kind, name=entry)
                    found = self.lookup(ref)
                    if found is not None and found[1].id == checkpoint_id:
                        return ref, found[0], found[1]
        return None

    @staticmethod
    def checkpoint_files(directory: Path) -> list[tuple[str, Path]]:
        """``(relative name, path)`` of every regular file of a checkpoint directory, sorted by
        name; the server's own ``checkpoint.json`` and symlinks are left out. A directory that
        vanishes (a racing deletion) gives what was found so far, possibly nothing."""
        out: list[tuple[str, Path]] = []
        for root, _dirs, files in os.walk(directory):  # errors ignored; symlinked dirs not followed
            for name in files:
                path = Path(root) / name
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                except OSError:
                    continue
                rel = path.relative_to(directory).as_posix()
                if rel != CHECKPOINT_METADATA:
                    out.append((rel, path))
        out.sort(key=lambda item: item[0])
        return out

    # ----------------------------------------------------------------------- delete

    def delete_checkpoint(self, ref: CheckpointRef) -> bool:
        """Delete a checkpoint: its name first (so a racing reader sees the checkpoint or
        nothing, never a half-deleted directory), then its version directory (renamed into
        ``.trash``, then removed). Returns True if the name pointed to a checkpoint of this
        server that had not expired (one whose metadata cannot be read counts: the name
        existed), False if there was nothing to delete. :class:`InvalidRequest` for an invalid
        run id or name, or a run directory that resolves outside the data directory."""
        link = self.link_path(ref)
        self._inside(link.parent.parent, "run_id")
        with self._swap_lock:
            target = self._target_of(link)
            if target is None:
                return False
            try:
                link.unlink()
            except FileNotFoundError:
                return False
        with contextlib.suppress(OSError):
            _fsync_dir(link.parent)
        record = _record_or_none(target)
        self._discard(target)
        return record is None or not record.expired()

    def delete_run(self, run_id: str) -> int:
        """Delete a run: every checkpoint (as :meth:`delete_checkpoint` does), then the run's
        directory with whatever else it holds. Returns how many live checkpoints were removed
        (0 for an unknown run). Stays inside the data directory: a run directory that is a
        symlink is unlinked, never followed. Stop the run's trainer first: a save that finishes
        while its run is deleted is lost."""
        run_dir = self.run_dir(run_id)
        try:
            mode = os.lstat(run_dir).st_mode
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(mode):  # a symlink or a stray file: remove the entry only
            with contextlib.suppress(FileNotFoundError):
                run_dir.unlink()
            return 0
        self._inside(run_dir, "run_id")
        removed = 0
        for kind in _KINDS:
            for entry in _listdir(run_dir / kind):
                if _NAME_RE.fullmatch(entry) is None:
                    continue
                if self.delete_checkpoint(CheckpointRef(run_id=run_id, kind=kind, name=entry)):
                    removed += 1
        with self._swap_lock:
            doomed = self._to_trash(run_dir, f"run.{run_id}")
        with contextlib.suppress(OSError):
            _fsync_dir(self.runs_dir)
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
        logger.info("run %s deleted (%d checkpoints)", run_id, removed)
        return removed

    # ----------------------------------------------------------------------- cleanup

    def _to_trash(self, path: Path, label: str) -> Path | None:
        """Rename ``path`` into ``{data_dir}/.trash`` (atomically: readers see all of it or
        nothing) and return its new path; ``path`` itself when it cannot be moved there (it is
        then deleted in place), None when it is already gone."""
        trash = self.root / _TRASH
        doomed = trash / f"{label}.{uuid.uuid4().hex[:12]}"
        try:
            _make_dir(trash)
            os.rename(path, doomed)
        except FileNotFoundError:
            return None if not os.path.lexists(path) else path
        except OSError:  # e.g. runs/ on another file system
            return path
        return doomed

    def _discard(self, directory: Path) -> None:
        """Remove a version directory no name points to any more (a superseded, expired or
        deleted version). Errors are logged, never raised."""
        doomed = self._to_trash(directory, f"{directory.parent.parent.name}.{directory.name}")
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
            if doomed.exists():
                logger.warning("could not delete the old checkpoint directory %s", doomed)

    def _expire(self, link: Path, directory: Path) -> None:
        """Delete an expired checkpoint, unless a save replaced it meanwhile."""
        with self._swap_lock:
            if self._link_target(link) != directory:
                return  # replaced by a new save (or deleted): not ours to remove
            try:
                link.unlink()
            except FileNotFoundError:
                return
        self._discard(directory)

    def _quarantine(
        self, ref: CheckpointRef, link: Path, directory: Path, reason: str
    ) -> Path | None:
        """Move a checkpoint the sweep cannot read to ``quarantine/<run>/<kind>/<name>-<time>``
        and drop its name, logging a WARNING; None (and the checkpoint left alone) if it cannot
        be moved."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        parent = self.quarantine_dir / ref.run_id / ref.kind
        try:
            parent.mkdir(parents=True, exist_ok=True)
            dest = parent / f"{ref.name}-{stamp}"
            n = 1
            while os.path.lexists(dest):
                dest = parent / f"{ref.name}-{stamp}-{n}"
                n += 1
            shutil.move(directory, dest)
            _fsync_dir(parent)
        except OSError as exc:
            logger.warning(
                "storage sweep: checkpoint %s has unreadable metadata (%s) and could not be "
                "moved to %s (%s); left in place",
                ref.uri,
                reason,
                parent,
                exc,
            )
            return None
        with contextlib.suppress(OSError):
            link.unlink()
        logger.warning(
            "storage sweep: checkpoint %s has unreadable metadata (%s); its files were moved "
            "to %s (not deleted)",
            ref.uri,
            reason,
            dest,
        )
        return dest

    def sweep(self) -> int:
        """Clean up after a crash and remove expired checkpoints. Returns how many entries were
        removed.

        Removed: ``.trash`` (deletions under way), the run's ``.tmp`` (saves that were never
        acknowledged), temporary links, version directories in ``.store`` that no name points
        to (a superseded or deleted version, or a save that crashed before its swap, never
        acknowledged), and expired checkpoints. A named checkpoint whose ``checkpoint.json``
        cannot be read is never deleted: it is moved to ``{data_dir}/quarantine`` with a
        WARNING. Errors on one entry are logged and skipped.

        Call it only while nothing writes to the data directory (at server start-up): a save
        under way would be removed."""
        removed = 0
        for entry in _listdir(self.root / _TRASH):
            _remove(self.root / _TRASH / entry)
            removed += 1
        for run_id in _listdir(self.runs_dir):
            run_dir = self.runs_dir / run_id
            if _NAME_RE.fullmatch(run_id) is None or not _is_real_dir(run_dir):
                continue
            try:
                removed += self._sweep_run(run_id, run_dir)
            except OSError as exc:
                logger.warning("storage sweep: skipped run %s: %s", run_id, exc)
        if removed:
            logger.info("storage sweep removed %d stale entries", removed)
        return removed

    def _sweep_run(self, run_id: str, run_dir: Path) -> int:
        """Sweep one run (see :meth:`sweep`). Raises OSError, having deleted no version, when a
        folder of names cannot be listed."""
        removed = 0
        for entry in _listdir(run_dir / _TMP):  # interrupted saves: never acknowledged
            _remove(run_dir / _TMP / entry)
            removed += 1
        live: set[str] = set()  # every version a name points to, whatever its state
        for kind in _KINDS:
            folder = run_dir / kind
            try:
                entries = sorted(os.listdir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                link = folder / entry
                # Our temporary links are ".<name>.<uid>.tmp"; a checkpoint name never starts
                # with "." (but may end in ".tmp").
                if entry.startswith(".") and entry.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        link.unlink()
                    continue
                target = self._link_target(link)
                if target is None:
                    continue  # not one of our links: leave it alone
                live.add(target.name)
                if _NAME_RE.fullmatch(entry) is None or not _is_real_dir(target):
                    continue
                ref = CheckpointRef(run_id=run_id, kind=kind, name=entry)
                try:
                    record = _read_record(target)
                except _UnreadableRecord as exc:
                    self._quarantine(ref, link, target, str(exc))
                    continue
                if record.expired():
                    self._expire(link, target)
                    removed += 1
        for entry in _listdir(run_dir / _STORE):
            if entry not in live:
                _remove(run_dir / _STORE / entry)
                removed += 1
        return removed
