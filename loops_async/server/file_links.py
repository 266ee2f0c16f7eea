"""Signed download links for checkpoint files (``GET /files/<token>``), the local server's
stand-in for presigned S3 URLs.

A token names a file by checkpoint (run id, kind, name), the checkpoint's store directory, the
file's relative name and an expiry time, and carries an HMAC-SHA256 signature made with a secret
that never leaves the process. A request can therefore only reach a file the server listed
itself: a token that was not signed here, was altered, has expired, names a checkpoint that was
replaced or deleted since, or resolves outside the checkpoint directory opens nothing. Like a
presigned URL, a token is its own credential (the API-key check does not apply to ``/files/``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from pathlib import Path, PurePosixPath

import msgspec

from .._codec import encode as _encode
from .backend import InvalidRequest
from .storage import CHECKPOINT_METADATA, CheckpointRef, Storage, validate_name

__all__ = ["LINK_TTL_SECONDS", "FileLinks"]

LINK_TTL_SECONDS = 3600.0
"""How long a download link stays valid."""

_SIG_BYTES = 18
_Payload = tuple[str, str, str, str, str, int]
_decoder = msgspec.json.Decoder(_Payload)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FileLinks:
    """Makes and checks download tokens for the files of ``storage``'s checkpoints."""

    def __init__(
        self, storage: Storage, *, ttl: float = LINK_TTL_SECONDS, secret: bytes | None = None
    ) -> None:
        self.storage = storage
        self.ttl = ttl
        self._secret = secret if secret is not None else secrets.token_bytes(32)

    def __repr__(self) -> str:
        return f"FileLinks({self.storage!r}, ttl={self.ttl:g})"

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_SIG_BYTES]

    def token(self, ref: CheckpointRef, directory: Path, relative_name: str) -> str:
        """A token for ``relative_name`` inside checkpoint ``ref`` (stored in ``directory``)."""
        expires = int(time.time() + self.ttl)
        payload = _encode((ref.run_id, ref.kind, ref.name, directory.name, relative_name, expires))
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def resolve(self, token: str) -> Path | None:
        """The file a token names, or None when the token is not valid (any reason)."""
        encoded, dot, signature = token.rpartition(".")
        if not dot or len(token) > 4096:
            return None
        try:
            payload, sig = _unb64(encoded), _unb64(signature)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(sig, self._sign(payload)):
            return None
        try:
            run_id, kind, name, dirname, rel, expires = _decoder.decode(payload)
            validate_name(run_id, "run_id")
            validate_name(name, "name")
        except (msgspec.DecodeError, InvalidRequest):
            return None
        if expires < time.time() or kind not in ("weights", "sampler_weights"):
            return None
        parts = PurePosixPath(rel).parts
        if (
            not parts
            or rel != PurePosixPath(*parts).as_posix()
            or rel.startswith("/")
            or any(part in ("", ".", "..") for part in parts)
            or "\\" in rel
            or rel == CHECKPOINT_METADATA
        ):
            return None
        ref = CheckpointRef(
            run_id=run_id, kind="weights" if kind == "weights" else "sampler_weights", name=name
        )
        found = self.storage.lookup(ref)
        if found is None or found[0].name != dirname:
            return None
        directory = found[0]
        path = directory.joinpath(*parts)
        if path.is_symlink() or not path.is_file():
            return None
        if not path.resolve().is_relative_to(directory.resolve()):
            return None
        return path
