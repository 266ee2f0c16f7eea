"""A bad local model directory as ``base_model`` is a 422 naming the field, never a 500, and the
server keeps serving: unusable ``config.json`` contents, unreadable files, odd file types."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loops_async.server import LocalServer
from loops_async.server.models import (
    MAX_CONFIG_BYTES,
    InvalidModelError,
    UnknownModelError,
    resolve_model,
)

from ._http import MODEL, assert_422

BAD_CONFIGS: dict[str, tuple[str, str]] = {
    # id: (config.json text, a word the error detail names)
    "list": ("[1, 2, 3]", "JSON object"),
    "string": ('"llama"', "JSON object"),
    "text_config_null": ('{"text_config": null, "vocab_size": 32}', "text_config"),
    "text_config_list": ('{"text_config": [], "vocab_size": 32}', "text_config"),
    "vocab_infinity": ('{"vocab_size": Infinity}', "vocab_size"),
    "vocab_nan": ('{"vocab_size": NaN}', "vocab_size"),
    "vocab_negative": ('{"vocab_size": -5}', "vocab_size"),
    "vocab_zero": ('{"vocab_size": 0}', "vocab_size"),
    "vocab_float": ('{"vocab_size": 32.5}', "vocab_size"),
    "vocab_bool": ('{"vocab_size": true}', "vocab_size"),
    "vocab_string": ('{"vocab_size": "32"}', "vocab_size"),
    "vocab_huge": ('{"vocab_size": 1e400}', "vocab_size"),
    "vocab_bigint": ('{"vocab_size": 123456789012345678901234567890}', "vocab_size"),
    "vocab_in_text_config_bad": ('{"text_config": {"vocab_size": -1}}', "vocab_size"),
    "vocab_missing": ('{"hidden_size": 64}', "vocab_size"),
    "empty_object": ("{}", "vocab_size"),
    "context_zero": ('{"vocab_size": 32, "max_position_embeddings": 0}', "max_position"),
    "context_negative": ('{"vocab_size": 32, "max_position_embeddings": -8}', "max_position"),
    "context_float": ('{"vocab_size": 32, "max_position_embeddings": 1e3}', "max_position"),
    "context_infinity": ('{"vocab_size": 32, "max_position_embeddings": Infinity}', "max_pos"),
    "n_positions_negative": ('{"vocab_size": 32, "n_positions": -1}', "n_positions"),
    "invalid_json": ('{"vocab_size": 32,', "not valid JSON"),
    "empty_file": ("", "not valid JSON"),
    "deeply_nested": ("[" * 200_000, "not valid JSON"),
    "digits_limit": ('{"vocab_size": ' + "9" * 5000 + "}", "not valid JSON"),
}


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(backend="null") as srv:
        yield srv


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one model directory per entry of BAD_CONFIGS, plus odd ones."""
    root = tmp_path_factory.mktemp("models")
    for key, (text, _) in BAD_CONFIGS.items():
        (root / key).mkdir()
        (root / key / "config.json").write_text(text, encoding="utf-8")
    (root / "bad_utf8").mkdir()
    (root / "bad_utf8" / "config.json").write_bytes(b'{"vocab_size": 32, "x": "\xff\xfe"}')
    (root / "too_large").mkdir()
    (root / "too_large" / "config.json").write_bytes(b" " * (MAX_CONFIG_BYTES + 1) + b"{}")
    (root / "symlink_loop").mkdir()
    os.symlink("config.json", root / "symlink_loop" / "config.json")
    (root / "config_is_a_dir").mkdir()
    (root / "config_is_a_dir" / "config.json").mkdir()
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "config.json")  # must never be opened (it would block)
    (root / "unreadable").mkdir()
    (root / "unreadable" / "config.json").write_text('{"vocab_size": 32}', encoding="utf-8")
    (root / "good").mkdir()
    (root / "good" / "config.json").write_text(
        '{"text_config": {"vocab_size": 77, "max_position_embeddings": 99}, "x": NaN}',
        encoding="utf-8",
    )
    return root


def _session(client: httpx.Client) -> str:
    r = client.post("/v1/loops/sessions")
    assert r.status_code == 200, r.text
    return str(r.json()["session"]["id"])


def _create(client: httpx.Client, session: str, base_model: str) -> httpx.Response:
    body = {"session_id": session, "base_model": base_model, "lora_rank": 4}
    return client.post("/v1/loops/trainers", json=body)


def _healthy(client: httpx.Client, session: str) -> None:
    assert client.get("/v1/loops/capabilities").status_code == 200
    assert _create(client, session, MODEL).status_code == 200


@pytest.mark.parametrize("key", sorted(BAD_CONFIGS))
def test_bad_config_is_422(client: httpx.Client, models: Path, key: str) -> None:
    session = _session(client)
    assert_422(_create(client, session, str(models / key)), "base_model", BAD_CONFIGS[key][1])
    _healthy(client, session)


@pytest.mark.parametrize(
    ("key", "needle"),
    [
        ("bad_utf8", "not valid JSON"),
        ("too_large", "larger than"),
        ("symlink_loop", "cannot read"),
        ("config_is_a_dir", "not a local directory with a config.json"),
        ("fifo", "not a local directory with a config.json"),
        ("does_not_exist", "unknown base_model"),
    ],
)
def test_odd_files_are_422(client: httpx.Client, models: Path, key: str, needle: str) -> None:
    session = _session(client)
    assert_422(_create(client, session, str(models / key)), "base_model", needle)
    _healthy(client, session)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads unreadable files"
)
def test_unreadable_directory_is_422(client: httpx.Client, models: Path) -> None:
    session = _session(client)
    config = models / "unreadable" / "config.json"
    config.chmod(0)
    try:
        assert_422(_create(client, session, str(config.parent)), "base_model", "cannot read")
    finally:
        config.chmod(0o644)
    (models / "unreadable").chmod(0)
    try:
        assert_422(_create(client, session, str(models / "unreadable")), "base_model")
    finally:
        (models / "unreadable").chmod(0o755)
    _healthy(client, session)


def test_permission_errors_are_422(
    client: httpx.Client, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same as above without needing a non-root user: the operating system's answers for
    an unreadable directory (stat fails) and an unreadable file (open fails) are simulated."""
    session = _session(client)
    real_stat, real_open = os.stat, os.open
    denied = {"call": "", "under": ""}  # which call fails, for paths under which directory

    def fails(call: str, path: object) -> bool:
        return denied["call"] == call and str(path).startswith(denied["under"])

    def stat(path: Any, *args: Any, **kw: Any) -> os.stat_result:
        if fails("stat", path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kw)

    def open_(path: Any, *args: Any, **kw: Any) -> int:
        if fails("open", path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "open", open_)
    for call in ("stat", "open"):
        target = models / "unreadable" / call
        target.mkdir(exist_ok=True)
        (target / "config.json").write_text('{"vocab_size": 32}', encoding="utf-8")
        denied.update(call=call, under=str(target))
        assert_422(_create(client, session, str(target)), "base_model", "Permission denied")
    denied.update(call="", under="")
    _healthy(client, session)


def test_sampler_route_rejects_bad_config_too(client: httpx.Client, models: Path) -> None:
    session = _session(client)
    body = {"session_id": session, "base_model": str(models / "vocab_nan")}
    assert_422(client.post("/v1/loops/samplers", json=body), "base_model", "vocab_size")
    _healthy(client, session)


def test_good_local_config_is_accepted(client: httpx.Client, models: Path) -> None:
    session = _session(client)
    r = _create(client, session, str(models / "good"))
    assert r.status_code == 200, r.text


def test_resolve_model_raises_only_its_own_errors(models: Path) -> None:
    for key in BAD_CONFIGS:
        with pytest.raises(InvalidModelError):
            resolve_model(str(models / key))
    for name in ("", "~no-such-user-loops/x", "a\x00b", "x" * 5000, str(models / "fifo")):
        with pytest.raises(UnknownModelError):
            resolve_model(name)
    spec = resolve_model(str(models / "good"))
    assert (spec.vocab_size, spec.max_seq_len) == (77, 99)
    assert spec.path == (models / "good").resolve()
