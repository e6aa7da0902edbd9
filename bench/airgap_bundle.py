"""Air-gap bundles: create and verify against sha256sum and zstd -1, and the OCI mirror
against skopeo copy, all on the same data in the same run.

Goals (issue 7): verify >= 70 % of sha256sum's throughput; create >= 50 % of the lower of
sha256sum and zstd -1 (one thread each, as the tools run by default; each tool's best of
three runs). Debian 12's sha256sum has no SHA-NI code, so `openssl dgst -sha256` (which
has, as Python's hashlib does) is printed beside it.

- create: `create_bundle` for a profile whose vLLM model is a local directory of
  `--size` MiB of incompressible weights (four files): the model mirror copies them in,
  hashing, and the bundle copies them again into blobs/, hashing again.
- verify: `verify` of that bundle (every blob hashed, two threads).
- sha256sum / zstd -1: the same four files, read from the page cache like the others.
- mirror: one image with a `--image-size` MiB layer in a local docker-registry, fetched by
  `mirror_images` and by `skopeo copy docker://… oci:…`.

Run on an otherwise idle machine:
    uv run python bench/airgap_bundle.py [--size 1024] [--image-size 256]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
VERIFY_GOAL = 0.70
CREATE_GOAL = 0.50
FILES = 4


def _weights(folder: Path, megabytes: int) -> int:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    per_file = megabytes // FILES << 20
    for index in range(FILES):
        with (folder / f"model-{index + 1:05d}-of-{FILES:05d}.safetensors").open("wb") as out:
            for _ in range(per_file >> 20):
                out.write(os.urandom(1 << 20))
    return per_file * FILES


def _profile(folder: Path, weights: Path) -> Path:
    text = (ROOT / "profiles/air-gapped.yaml").read_text()
    text = text[: text.index("\nbundle:")] + (
        f"\nbundle:\n  models:\n    sources:\n      qwen2.5-7b-instruct-awq: file:{weights}\n"
    )
    gguf = folder / "fallback.gguf"
    gguf.write_bytes(b"GGUF" + b"\1" * 1020)
    text = text.replace("pkg:smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", f"file:{gguf}")
    text = text.replace(
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hashlib.sha256(gguf.read_bytes()).hexdigest(),
    )
    from sovereign.bundle.create import model_digest

    files = [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in weights.iterdir()]
    text = text.replace(
        "6f1c2b2a8d0e4b7f9a3c5d7e1f2a4b6c8d0e2f4a6b8c0d2e4f6a8b0c2d4e6f8a", model_digest(files)
    )
    path = folder / "profile.yaml"
    path.write_text(text.replace("../docs/", f"{ROOT}/docs/"))
    return path


def _timed(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def _best_of_three(command: list[str]) -> float:
    return min(_timed(command) for _ in range(3))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _oci_layout(folder: Path, megabytes: int) -> None:
    """One linux/amd64 image whose single uncompressed layer holds `megabytes` of noise."""
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        payload = os.urandom(megabytes << 20)
        info = tarfile.TarInfo("weights.bin")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    layer = put(buffer.getvalue())
    config = put(
        json.dumps(
            {"architecture": "amd64", "os": "linux",
             "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}
        ).encode()
    )  # fmt: skip
    manifest = put(
        json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
             "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}]}
        ).encode()
    )  # fmt: skip
    (folder / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (folder / "index.json").write_text(
        json.dumps(
            {"schemaVersion": 2, "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
                 "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}
        )
    )  # fmt: skip


def _mirror_vs_skopeo(work: Path, megabytes: int) -> tuple[float, float]:
    from sovereign.mirror.fetch import Fetcher
    from sovereign.mirror.oci import mirror_images

    port = _free_port()
    config = work / "registry.json"
    config.write_text(
        json.dumps(
            {"version": 0.1, "storage": {"filesystem": {"rootdirectory": str(work / "store")}},
             "http": {"addr": f"127.0.0.1:{port}"}, "log": {"level": "error"}}
        )
    )  # fmt: skip
    server = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        _oci_layout(work / "seed", megabytes)
        ref = f"127.0.0.1:{port}/bench/weights:1"
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{work / 'seed'}:bench",
             f"docker://{ref}"], check=True,
        )  # fmt: skip
        skopeo = _timed(
            ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
             f"oci:{work / 'skopeo'}:bench"],
        )  # fmt: skip
        started = time.monotonic()
        with Fetcher(console=Console(stderr=True, force_terminal=False)) as fetcher:
            mirror_images([ref], work / "mirror", fetcher)
        ours = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    return ours, skopeo


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024, help="MiB of weights in the bundle")
    parser.add_argument("--image-size", type=int, default=256, help="MiB in the image layer")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    from sovereign.bundle.create import CreateOptions, create_bundle
    from sovereign.bundle.manifest import verify
    from sovereign.mirror.fetch import Fetcher
    from sovereign.profile.loader import load_profile

    work = Path(tempfile.mkdtemp(prefix="bench-airgap-"))
    print(f"air-gap bundle, {datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs")
    try:
        data = _weights(work / "weights", args.size)
        files = sorted((work / "weights").glob("*.safetensors"))
        profile_path = _profile(work, work / "weights")
        key = Ed25519PrivateKey.generate()
        sha = _best_of_three(["sha256sum", *map(str, files)])
        openssl = _best_of_three(["openssl", "dgst", "-sha256", *map(str, files)])
        zstd = _best_of_three(["zstd", "-1", "-q", "-c", *map(str, files)])
        options = CreateOptions(work / "bundle", key, work / "cache")
        started = time.monotonic()
        with Fetcher(console=Console(stderr=True, force_terminal=False)) as fetcher:
            create_bundle(load_profile(profile_path), profile_path, options, fetcher, print)
        create = time.monotonic() - started
        started = time.monotonic()
        result = verify(work / "bundle", key.public_key())
        checked = time.monotonic() - started
        assert result.ok, result.findings
        ours, skopeo = _mirror_vs_skopeo(work, args.image_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(seconds: float, size: int = data) -> float:
        return size / seconds / 1e6

    print(f"  data                  {data / 1e6:8.0f} MB in {FILES} files")
    for name, seconds in (("sha256sum", sha), ("openssl dgst -sha256", openssl),
                          ("zstd -1", zstd), ("bundle create", create),
                          ("bundle verify", checked)):  # fmt: skip
        print(f"  {name:<20}  {rate(seconds):8.0f} MB/s  ({seconds:.2f} s)")
    image = (args.image_size << 20) + 3072
    print(f"  oci mirror            {rate(ours, image):8.0f} MB/s  ({ours:.2f} s)")
    print(f"  skopeo copy           {rate(skopeo, image):8.0f} MB/s  ({skopeo:.2f} s)")
    verify_share = rate(checked) / rate(sha)
    create_share = rate(create) / min(rate(sha), rate(zstd))
    verdicts = (
        ("verify vs sha256sum", verify_share, VERIFY_GOAL),
        ("create vs min(sha256sum, zstd -1)", create_share, CREATE_GOAL),
    )
    for what, share, goal in verdicts:
        print(f"{what}: {share:.0%} (goal {goal:.0%}): {'PASS' if share >= goal else 'MISS'}")
    print(f"verify vs openssl dgst -sha256 (SHA-NI): {rate(checked) / rate(openssl):.0%}")
    print(f"oci mirror vs skopeo copy: {ours / skopeo:.2f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
