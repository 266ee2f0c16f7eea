"""Generate docs/api.md from the docstrings of every public name.

    python scripts/gen_api_docs.py          # rewrite docs/api.md
    python scripts/gen_api_docs.py --check  # exit 1 if docs/api.md is out of date

A test runs ``--check``, so the reference can never drift from the code.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import loops_async
import loops_async.server
import loops_async.tinker

OUT = Path(__file__).resolve().parent.parent / "docs" / "api.md"

SECTIONS: list[tuple[str, ModuleType, list[str]]] = [
    (
        "Clients",
        loops_async,
        [
            "ServiceClient",
            "TrainingClient",
            "SamplingClient",
            "APIFuture",
            "OperationFuture",
            "ForwardBackwardFuture",
        ],
    ),
    (
        "Wire types",
        loops_async,
        [
            "Datum",
            "ModelInput",
            "EncodedTextChunk",
            "ImageChunk",
            "ImageAssetPointerChunk",
            "Chunk",
            "ModelInputChunk",
            "ExternalRef",
            "TensorData",
            "ArrayData",
            "DType",
            "AdamParams",
            "LossFnType",
            "CustomLossFn",
            "SamplingParams",
            "AvailabilityModel",
            "TrainerScope",
            "SamplerScope",
            "WandbConfig",
        ],
    ),
    (
        "Experiment tracking",
        loops_async,
        ["MetricsSink", "WandbSink", "loops_log_kl_sample_train"],
    ),
    (
        "Results",
        loops_async,
        [
            "ForwardBackwardOutput",
            "OptimStepResponse",
            "SaveWeightsResponse",
            "SaveWeightsForSamplerResponse",
            "LoadWeightsResponse",
            "InitTrainerServerResponse",
            "GetInfoResponse",
            "ModelData",
            "SampleResponse",
            "SampledSequence",
            "StopReason",
            "Checkpoint",
            "CheckpointFilesResponse",
            "CheckpointDownload",
            "CheckpointFile",
            "CheckpointTarget",
            "LoraAdapterConfig",
            "ExternalRef",
            "ServerCapabilities",
            "SupportedModel",
        ],
    ),
    ("Local server (`loops_async.server`)", loops_async.server, loops_async.server.__all__),
    (
        "tinker layer (`loops_async.tinker`)",
        loops_async.tinker,
        [
            "install",
            "uninstall",
            "is_installed",
            "TinkerAlreadyInstalledError",
            "ServiceClient",
            "TrainingClient",
            "SamplingClient",
            "RestClient",
            "APIFuture",
            "AwaitableConcurrentFuture",
            "Datum",
            "TensorData",
            "AdamParams",
            "SampleResponse",
            "SampledSequence",
            "ParsedCheckpointTinkerPath",
            "TinkerError",
            "RequestFailedError",
        ],
    ),
]


def _doc(obj: Any) -> str:
    text = inspect.cleandoc(obj.__doc__ or "").strip()
    text = text.replace("``", "`").replace(":meth:", "").replace(":class:", "")
    # keep "Args:" blocks and examples as they are written
    return text.replace("::\n", ":\n")


def _signature(obj: Any) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    text = re.sub(r"(: |-> )'([^']*)'", r"\1\2", text)  # postponed annotations
    return text.replace("loops_async.types.", "").replace("collections.abc.", "")


def _members(cls: type) -> list[str]:
    lines: list[str] = []
    for name, member in cls.__dict__.items():
        if name.startswith("_") and name not in ("__init__",):
            continue
        if isinstance(member, property):
            doc = _doc(member)
            lines.append(f"- **`{name}`** (property) — {doc.splitlines()[0] if doc else ''}")
        elif inspect.isfunction(member) and name != "__init__":
            sig = _signature(member).replace("(self, ", "(").replace("(self)", "()")
            doc = _doc(member)
            first = doc.split("\n\n")[0].replace("\n", " ") if doc else ""
            lines.append(f"- **`{name}{sig}`** — {first}")
        elif isinstance(member, classmethod | staticmethod):
            func = member.__func__
            sig = _signature(func).replace("(cls, ", "(").replace("(cls)", "()")
            doc = _doc(func)
            first = doc.split("\n\n")[0].replace("\n", " ") if doc else ""
            lines.append(f"- **`{name}{sig}`** — {first}")
    return lines


def render() -> str:
    parts = [
        "# API reference",
        "",
        "Generated from the docstrings by `scripts/gen_api_docs.py` (a test keeps it current).",
        "Everything below is importable from `loops_async` (the server names from",
        "`loops_async.server`). Exceptions: see [the exception tree](exceptions.md).",
        "",
    ]
    for title, module, names in SECTIONS:
        parts += [f"## {title}", ""]
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                sig = _signature(obj) if not issubclass(obj, BaseException) else ""
                parts += [f"### `{name}{sig}`", "", _doc(obj), ""]
                members = _members(obj)
                if members:
                    parts += [*members, ""]
            elif inspect.isfunction(obj):
                parts += [f"### `{name}{_signature(obj)}`", "", _doc(obj), ""]
            else:  # a type alias
                parts += [f"### `{name}`", "", f"`{obj}`", ""]
    return "\n".join(parts).rstrip() + "\n"


def documented_names() -> set[str]:
    """Every name the reference covers."""
    return {name for _, _, names in SECTIONS for name in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            print("docs/api.md is out of date: run python scripts/gen_api_docs.py")
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
