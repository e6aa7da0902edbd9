"""Run the program against Pulumi's mock engine and write what it would create as YAML.

No cluster and no Pulumi CLI: `pulumi.runtime.set_mocks` stands in for the engine and
records every resource's inputs, which for pulumi-kubernetes are the manifest itself. The
tests check these manifests with kubernetes-validate and the guardrails in policies/k8s/;
`python -m stacks.synth --out DIR` writes them for review.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
from ruamel.yaml import YAML

PROJECT = "sovereign"
PROJECT_DIR = Path(__file__).resolve().parent.parent
# How the mock engine marks a secret value inside resource inputs.
SECRET_SIGNATURE = ("4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270")


@dataclass(frozen=True)
class Synthesized:
    """One registered resource: its type token, logical name and inputs."""

    type: str
    name: str
    custom: bool
    inputs: dict[str, Any]

    @property
    def is_kubernetes(self) -> bool:
        return self.custom and self.type.startswith("kubernetes:")

    def manifest(self) -> dict[str, Any]:
        return _plain(self.inputs)  # type: ignore[no-any-return]


class _Recorder(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[Synthesized] = []

    def new_resource(
        self, args: pulumi.runtime.MockResourceArgs
    ) -> tuple[str | None, dict[str, Any]]:
        self.resources.append(
            Synthesized(args.typ, args.name, bool(args.custom), dict(args.inputs))
        )
        state = dict(args.inputs)
        if args.typ == "kubernetes:core/v1:Service":
            # The API server would allocate a ClusterIP; the stack reads it back.
            spec = dict(state.get("spec") or {})
            if spec.get("clusterIP") != "None":
                spec["clusterIP"] = f"10.96.0.{len(self.resources) % 250 + 1}"
            state["spec"] = spec
        return f"{args.name}-id", state

    def call(
        self, args: pulumi.runtime.MockCallArgs
    ) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        raise NotImplementedError(f"the stack calls no provider functions, got {args.token}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get(SECRET_SIGNATURE[0]) == SECRET_SIGNATURE[1]:
            return _plain(value.get("value"))
        return {key: _plain(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        # The engine's wire format (protobuf Struct) carries every number as a double.
        return int(value)
    return value


def stack_config(path: Path, secrets: Mapping[str, str]) -> dict[str, str]:
    """A stack file's config as the engine hands it to a program: every value a string."""
    data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8")) or {}
    flat: dict[str, str] = {}
    for key, value in (data.get("config") or {}).items():
        flat[key] = value if isinstance(value, str) else json.dumps(value)
    for key, value in secrets.items():
        flat[f"{PROJECT}:{key}"] = value
    return flat


@functools.cache
def _synthesis_thread() -> ThreadPoolExecutor:
    """The one thread every synthesis in this process runs on, with its own event loop.

    The SDK drives its RPCs on the thread's current loop, and the mock engine gives each
    executor thread a loop of its own that it never closes. On a thread that lives as long
    as the process, none of those loops is ever collected unclosed, and the caller's own
    event loop state is never read or changed (reading it would create a loop in 3.11).
    """
    return ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="pulumi-synthesis",
        initializer=lambda: asyncio.set_event_loop(asyncio.new_event_loop()),
    )


def synthesize(
    build: Callable[[], object],
    config: Mapping[str, str],
    *,
    stack: str = "datacenter",
    secret_keys: tuple[str, ...] = (),
) -> list[Synthesized]:
    """Run `build` under the mock engine with `config`; every resource it registered."""
    recorder = _Recorder()

    def run_in_engine() -> None:
        pulumi.runtime.set_mocks(recorder, project=PROJECT, stack=stack, preview=False)
        pulumi.runtime.set_all_config(dict(config), list(secret_keys))

        @pulumi.runtime.test  # type: ignore[untyped-decorator]
        def run() -> None:
            build()

        run()

    _synthesis_thread().submit(run_in_engine).result()
    return recorder.resources


def manifests(resources: list[Synthesized]) -> list[dict[str, Any]]:
    return [resource.manifest() for resource in resources if resource.is_kubernetes]


def manifest_name(manifest: Mapping[str, Any]) -> str:
    meta = manifest.get("metadata", {})
    namespace = meta.get("namespace", "_cluster")
    return f"{namespace}/{manifest['kind']}-{meta.get('name', '?')}.yaml"


def _dump(manifest: Mapping[str, Any]) -> str:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    # No folding: a folded quoted string can read back with a different space (Rego tabs).
    yaml.width = 1 << 30
    buffer = io.StringIO()
    # In the order people write manifests: apiVersion, kind, metadata, then the rest.
    first = [key for key in ("apiVersion", "kind", "metadata") if key in manifest]
    ordered = {key: manifest[key] for key in [*first, *(k for k in manifest if k not in first)]}
    yaml.dump(ordered, buffer)
    return buffer.getvalue()


def write_manifests(items: list[dict[str, Any]], out: Path) -> list[Path]:
    written = []
    for manifest in items:
        path = out / manifest_name(manifest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_dump(manifest), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    from stacks import config as stack_settings
    from stacks.program import deploy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="datacenter")
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args(argv)
    path = stack_settings.stack_file(PROJECT_DIR, options.stack)
    placeholders = {secret.key: f"<{secret.key}>" for secret in stack_settings.SECRETS}
    flat = stack_config(path, placeholders)

    def build() -> None:
        settings = stack_settings.load(
            pulumi.Config(stack_settings.NAMESPACE), options.stack, PROJECT_DIR
        )
        deploy(settings)

    try:
        resources = synthesize(build, flat, stack=options.stack)
    except stack_settings.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in write_manifests(manifests(resources), options.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
