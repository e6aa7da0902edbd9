"""The air gap end to end: `sovereign bundle create` from real upstream servers on loopback,
`bundle verify`, `bundle import` into fresh, empty servers with the upstream ones stopped,
and installs from the imported mirrors alone: pip with --require-hashes, skopeo pulling
through the generated registries.conf, and apt-get installing a package with a dependency
from another suite into a throwaway chroot, through the generated deb822 source and keyring.

The chroot is an overlayfs over the host's /usr (upper directory in tmp_path, so the host
does not change) with its own /etc and /var, mounted inside `unshare --mount`: its mounts
live in a private mount namespace and vanish with the process, whatever happens.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from sovereign import tools
from sovereign.cli import app
from sovereign.distribution.builds import cache_root
from sovereign.distribution.wheelhouse import GATEWAY_LOCK
from sovereign.image.recipe import load_recipe
from tests.integration.airgap.aptrepo import Deb, build_deb, make_repository, signing_key
from tests.integration.airgap.registry import Registry, build_index, digest_of, skopeo
from tests.integration.airgap.servers import FileServer, file_server, need, pypiserver
from tests.integration.airgap.wheels import make_wheel, sha256
from tests.integration.conftest import free_port, start, stop, wait_listening

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[3]
AIR_GAPPED = ROOT / "profiles/air-gapped.yaml"
REPO = "acme/tiny-model"
COMMIT = hashlib.sha1(b"acme/tiny-model, roundtrip", usedforsecurity=False).hexdigest()
APT_TIMEOUT_S = 180


@dataclass
class Upstream:
    pypi: str
    lock: Path  # the two stand-in wheels alone
    bundle_lock: Path  # those, and the gateway's own lock, which the bundle builds a wheelhouse of
    registry: Registry
    app_digest: str  # team/app:1.0's linux/amd64 image manifest
    apt: str
    keyring: Path
    hub: str
    model_pin: str  # the hub model's sha256 pin, as the profile states it


@contextlib.contextmanager
def static_server(root: Path, log: Path) -> Iterator[str]:
    """Python's own static file server over `root`: it answers a directory URL with its
    index.html as text/html, which pip requires (fileserver.py sends no Content-Type)."""
    port = free_port()
    command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1"]
    process = start([*command, "--directory", str(root), str(port)], log)
    try:
        wait_listening(f"http://127.0.0.1:{port}/", process, log, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def _invoke(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(argv))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output + result.stderr
    return result.exit_code, result.stdout, result.stderr


def _wheels(work: Path) -> tuple[Path, Path]:
    """Two pure wheels and a lock pinning both by hash, as `uv export` writes it; and a lock
    with the gateway's too, whose packages (`sovereign tools install gateway-packages`)
    are on the same index."""
    packages = work / "packages"
    hello = make_wheel(packages, "hello-sov", "1.0", licence="Apache-2.0")
    helper = make_wheel(packages, "helper-sov", "2.0", licence="MIT")
    make_wheel(packages, "hello-sov", "0.9")  # on the index, not pinned
    for package in tools.gateway_packages().iterdir():
        (packages / package.name).symlink_to(package)
    lock = work / "requirements.txt"
    lock.write_text(
        f"hello-sov==1.0 \\\n    --hash=sha256:{sha256(hello)}\n"
        f"helper-sov==2.0 \\\n    --hash=sha256:{sha256(helper)}\n"
    )
    bundle_lock = work / "bundle-requirements.txt"
    bundle_lock.write_text(lock.read_text() + GATEWAY_LOCK.read_text())
    return lock, bundle_lock


def _debs(work: Path) -> dict[str, list[Path]]:
    """sovapp needs sovlib >= 1.1, which only bookworm-updates has. The image recipe's
    packages, which every bundle carries, are stand-ins of the same names."""
    debs = work / "debs"
    debs.mkdir()
    recipe = load_recipe("debian").spec.packages_for("air-gapped")
    bookworm = [Deb(name, "1.0") for name in recipe]
    bookworm += [
        Deb("sovapp", "1.0", fields={"Depends": "sovlib (>= 1.1)"}),
        Deb("sovlib", "1.0"),
        Deb("sovdata", "1.0", arch="all"),
    ]
    updates = [Deb("sovlib", "1.1", fields={"Depends": "sovdata"})]
    return {
        "bookworm": [build_deb(debs, deb) for deb in bookworm],
        "bookworm-updates": [build_deb(debs, deb) for deb in updates],
    }


def _hub(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"architectures": ["Qwen2ForCausalLM"]}).encode(),
        "model.safetensors": hashlib.shake_256(b"weights").digest(8192),
        "README.md": b"---\nlicense: apache-2.0\n---\n# Tiny stand-in\n",
    }
    folder = root / REPO / COMMIT
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / ".lfs").write_text("model.safetensors\n")
    return files


@contextlib.contextmanager
def upstream(work: Path) -> Iterator[Upstream]:
    with contextlib.ExitStack() as stack:
        lock, bundle_lock = _wheels(work)
        pypi = stack.enter_context(pypiserver(work / "packages", work / "pypiserver.log"))
        images = build_index(work / "layout", "1.0")
        registry = Registry(work / "storage", work / "registry.log")
        stack.callback(registry.stop)
        registry.start()
        registry.push(work / "layout", "1.0", "team/app:1.0")
        registry.push(work / "layout", "1.0", "team/tool:1.0")
        amd64 = next(i for i in images if i.platform == "linux/amd64")
        key = stack.enter_context(
            signing_key(work / "archive", "Upstream <archive@sovereign.invalid>")
        )
        make_repository(work / "repo", key, _debs(work))
        apt = stack.enter_context(file_server(work / "repo", work / "apt.log"))
        _hub(work / "hub")
        hub = stack.enter_context(file_server(work / "hub", work / "hub.log", hub=True))
        pin = _hub_listing(work / "hub")
        yield Upstream(
            pypi, lock, bundle_lock, registry, amd64.digest, apt.url, key.keyring, hub.url, pin
        )


def _profile(work: Path, up: Upstream, mirrors: dict[str, str]) -> Path:
    """The air-gapped example, its bundle: section and model sources on the upstream
    servers, its mirrors: on the fresh ones."""
    gguf = work / "fallback.gguf"
    gguf.write_bytes(b"GGUF" + b"\1" * 1020)
    text = AIR_GAPPED.read_text()
    text = text[: text.index("\nbundle:")] + "\n" + _bundle_section(up)
    text = re.sub(
        r"\nmirrors:\n(?:  .*\n)+",
        "\nmirrors:\n"
        + "".join(f"  - kind: {kind}\n    url: {url}\n" for kind, url in mirrors.items()),
        text,
    )
    # The profile rules allow egress to the mirrors alone; the one allowed is now loopback.
    text = text.replace("mirror.ward.internal:443", urlsplit(mirrors["pypi"]).netloc)
    text = text.replace("pkg:smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", f"file:{gguf}")
    text = text.replace(
        "6f1c2b2a8d0e4b7f9a3c5d7e1f2a4b6c8d0e2f4a6b8c0d2e4f6a8b0c2d4e6f8a", up.model_pin
    )
    text = text.replace(
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hashlib.sha256(gguf.read_bytes()).hexdigest(),
    )
    path = work / "ward.yaml"
    path.write_text(text.replace("../docs/", f"{ROOT}/docs/"))
    return path


def _bundle_section(up: Upstream) -> str:
    host = up.registry.host
    return (
        "bundle:\n"
        "  wheels:\n"
        f"    index: {up.pypi}\n"
        f"    requirements: {up.bundle_lock}\n"
        '    python: ["3.11"]\n'
        "    platforms: [manylinux_2_36_x86_64]\n"
        "  images:\n"
        f"    - {host}/team/app:1.0\n"
        f"    - {host}/team/tool@{up.app_digest}\n"
        "  debian:\n"
        "    sources:\n"
        f"      - deb {up.apt} bookworm main\n"
        f"      - deb {up.apt} bookworm-updates main\n"
        f"    keyring: {up.keyring}\n"
        "    packages: [sovapp]\n"
        "  models:\n"
        f"    endpoint: {up.hub}\n"
        "    sources:\n"
        f"      qwen2.5-7b-instruct-awq: hf:{REPO}@{COMMIT}\n"
    )


def _hub_listing(hub: Path) -> str:
    """A directory model's pin: the sha256 of its `sha256sum` listing, sorted by path."""
    folder = hub / REPO / COMMIT
    files = sorted(p.name for p in folder.iterdir() if p.name != ".lfs")
    listing = "".join(f"{sha256(folder / name)}  {name}\n" for name in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _node_image(work: Path) -> Path:
    image = work / "image"
    image.mkdir()
    (image / "manifest.json").write_text(
        json.dumps({"profile": "radiology-ward", "recipe_hash": "cd" * 32})
    )
    (image / "disk.raw").write_bytes(b"disk")
    (image / "vmlinuz").write_bytes(b"kernel")
    return image


def _pip_install(pip_conf: Path, lock: Path, target: Path) -> subprocess.CompletedProcess[str]:
    """pip with the index the generated pip.conf names and no other configuration."""
    parser = configparser.ConfigParser()
    parser.read(pip_conf)
    assert set(parser["global"]) == {"index-url"}  # no extra index to fall back to
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-cache-dir",
            "--disable-pip-version-check", "--index-url", parser["global"]["index-url"],
            "--require-hashes", "-r", str(lock), "--target", str(target),
        ],
        capture_output=True, text=True, env={**env, "PIP_CONFIG_FILE": os.devnull},
        check=False, timeout=120,
    )  # fmt: skip


def _chroot(work: Path, node_config: Path) -> tuple[Path, Path]:
    """A root whose /usr is an overlay (mounted later) over the host's, whose apt knows
    only the generated source and keyring, and whose dpkg database is empty."""
    root, upper = work / "root", work / "upper"
    for directory in (
        "usr", "dev", "proc", "tmp", "etc/apt/apt.conf.d", "etc/apt/preferences.d",
        "etc/apt/sources.list.d", "etc/apt/keyrings", "etc/apt/trusted.gpg.d",
        "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/log/apt",
        "var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers",
    ):  # fmt: skip
        (root / directory).mkdir(parents=True)
    (root / "tmp").chmod(0o1777)
    for link in ("bin", "lib", "lib64", "sbin"):
        (root / link).symlink_to(f"usr/{link}")
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    (root / "var/lib/dpkg/status").touch()
    for relative in (
        "etc/apt/sources.list.d/sovereign.sources",
        "etc/apt/keyrings/sovereign-archive.gpg",
    ):
        shutil.copy(node_config / relative, root / relative)
    upper.mkdir()
    (work / "overlay-work").mkdir()
    return root, upper


def _apt_install(work: Path, root: Path, upper: Path, package: str) -> str:
    """apt-get update and install in the chroot, in a mount namespace of its own; gives
    `dpkg -s` of the package."""
    script = f"""
set -e
mount -t overlay overlay -o lowerdir=/usr,upperdir={upper},workdir={work / "overlay-work"} \
    {root}/usr
mount --rbind /dev {root}/dev
mount -t proc proc {root}/proc
chroot {root} apt-get -q update
chroot {root} apt-get -q install -y --no-install-recommends {package}
chroot {root} dpkg -s {package} sovlib
"""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=APT_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _unmount_leftovers(root)
    assert process.returncode == 0, output
    return output


def _unmount_leftovers(root: Path) -> None:
    """Nothing should be mounted outside the namespace; should anything be, it goes."""
    mounts = Path("/proc/mounts").read_text().split("\n")
    for mount in sorted((line.split()[1] for line in mounts if line), reverse=True):
        if mount.startswith(str(root)):
            subprocess.run(["umount", "-l", mount], check=False, timeout=30)


def test_a_bundle_made_upstream_installs_on_the_air_gapped_side_from_its_mirrors_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("docker-registry", "skopeo", "reprepro", "gpg", "gpgv", "dpkg-deb", "apt-get")
    need("unshare", "chroot", "mount")
    # llama-cpp-python's wheel, built from its sdist, stays where earlier runs left it.
    monkeypatch.setenv("SOVEREIGN_WHEEL_CACHE", str(cache_root()))
    monkeypatch.setenv("SOVEREIGN_TOOLS_DIR", str(tools.tools_dir()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    into = tmp_path / "imported"
    for part in ("pypi", "debian"):
        (into / part).mkdir(parents=True)
    fresh = Registry(tmp_path / "fresh-storage", tmp_path / "fresh-registry.log")
    key = tmp_path / "keys" / "bundle.pem"
    bundle = tmp_path / "bundle"
    with contextlib.ExitStack() as fresh_servers:
        fresh_servers.callback(fresh.stop)
        fresh.start()
        pypi_mirror = fresh_servers.enter_context(
            static_server(into / "pypi", tmp_path / "fresh-pypi.log")
        )
        apt_mirror = FileServer(into / "debian", tmp_path / "fresh-apt.log")
        fresh_servers.callback(apt_mirror.stop)
        apt_mirror.start()
        mirrors = {
            "pypi": f"{pypi_mirror}/simple/",
            "oci": f"http://{fresh.host}/",
            "debian": f"{apt_mirror.url}/",
            "models": "http://127.0.0.1:9/models/",
        }

        # The connected side.
        with upstream(tmp_path / "upstream") as up:
            profile = _profile(tmp_path, up, mirrors)
            assert _invoke("keys", "create", str(key))[0] == 0
            code, said, complaint = _invoke(
                "bundle", "create", str(profile), "--out", str(bundle), "--key", str(key),
                "--image", str(_node_image(tmp_path)),
            )  # fmt: skip
            assert code == 0, complaint
            upstream_host = up.registry.host
            app_digest = up.app_digest
            lock = up.lock
        # Every upstream server is stopped from here: nothing can fall back to them.
        trust = str(key.with_suffix(".pub"))
        code, said, complaint = _invoke("bundle", "verify", str(bundle), "--trust", trust)
        assert code == 0, complaint
        assert f"✓ bundle {bundle} verified" in said

        # The air-gapped side.
        argv = ["bundle", "import", str(bundle), "--trust", trust, "--into", str(into)]
        code, said, complaint = _invoke(*argv, "--registry", fresh.host)
        assert code == 0, complaint
        for kind in ("wheel", "deb", "oci-image", "model", "policy", "roles", "config"):
            assert re.search(rf"^  {kind}: \d+ → .*\(\d+ written", said, re.M), said
        assert "suites bookworm (main); bookworm-updates (main)" in said
        assert "✓ bundle sha256:" in said
        code, again, complaint = _invoke(*argv, "--registry", fresh.host)
        assert code == 0, complaint
        assert "✓ nothing changed: bundle sha256:" in again
        assert "written" not in again

        _check_files(into, tmp_path)
        node = into / "node-config"

        # pip: the lock's wheels, by hash, from the static PEP 503 tree alone.
        target = tmp_path / "site"
        done = _pip_install(node / "etc/pip.conf", lock, target)
        assert done.returncode == 0, done.stderr
        assert (target / "hello_sov" / "__init__.py").read_text().startswith("VERSION = '1.0'")
        assert (target / "helper_sov").is_dir()
        # The same wheels through pypiserver over the imported files.
        with pypiserver(into / "pypi/files", tmp_path / "pypiserver-imported.log") as index:
            conf = tmp_path / "pypiserver.conf"
            conf.write_text(f"[global]\nindex-url = {index}\n")
            done = _pip_install(conf, lock, tmp_path / "site-2")
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "site-2/hello_sov/__init__.py").is_file()
        _gateway_installs_from_the_imported_mirror(into, node, tmp_path / "gateway-venv")

        # skopeo: pulled from the fresh registry, and by the upstream names through the
        # generated registries.conf, which has nowhere else to go.
        pulled = tmp_path / "pulled"
        skopeo(
            "copy", "--src-tls-verify=false", f"docker://{fresh.host}/team/app:1.0",
            f"oci:{pulled}:app",
        )  # fmt: skip
        index = json.loads((pulled / "index.json").read_text())
        assert [m["digest"] for m in index["manifests"]] == [app_digest]
        registries = str(node / "etc/containers/registries.conf.d/sovereign.conf")
        for name in ("team/app:1.0", f"team/tool@{app_digest}"):
            raw = skopeo("--registries-conf", registries, "inspect", "--raw",
                         f"docker://{upstream_host}/{name}")  # fmt: skip
            assert digest_of(raw.encode()) == app_digest

        # apt: sovapp, and sovlib 1.1 from bookworm-updates, into the chroot only.
        root, upper = _chroot(tmp_path, node)
        output = _apt_install(tmp_path, root, upper, "sovapp")
        assert re.search(r"Package: sovapp\nStatus: install ok installed", output), output
        assert re.search(
            r"Package: sovlib\nStatus: install ok installed\n(.+\n)*Version: 1\.1", output
        )
        assert (upper / "share/doc/sovapp/copyright").is_file()
        assert (upper / "share/doc/sovdata/copyright").is_file()
        assert not Path("/usr/share/doc/sovapp").exists()

        _registry_down_stops_the_import_first(bundle, trust, tmp_path / "third")
        _tampered_wheel_is_refused(bundle, trust, tmp_path / "second")


def _gateway_installs_from_the_imported_mirror(into: Path, node: Path, venv: Path) -> None:
    """The gateway's wheelhouse: every wheel by hash from the imported PEP 503 tree, with
    the requirements the bundle carried; pip runs from its own wheel, as on a node."""
    requirements = into / "config" / "wheelhouse" / "requirements.txt"
    assert "sovereign-gateway[llamacpp]==0.1.0 \\" in requirements.read_text()
    [installer] = (into / "pypi" / "files").glob("pip-*.whl")
    parser = configparser.ConfigParser()
    parser.read(node / "etc/pip.conf")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": os.devnull}
    done = subprocess.run(
        [str(venv / "bin/python"), f"{installer}/pip", "install", "--no-cache-dir",
         "--disable-pip-version-check", "--index-url", parser["global"]["index-url"],
         "--require-hashes", "-r", str(requirements)],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    admin = subprocess.run(
        [str(venv / "bin/sovereign-gateway"), "admin", "lock", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert admin.returncode == 0, admin.stderr
    assert not (venv / "bin/pip").exists()


def _check_files(into: Path, tmp_path: Path) -> None:
    node = into / "node-config"
    sources = (node / "etc/apt/sources.list.d/sovereign.sources").read_text()
    assert "Suites: bookworm bookworm-updates\n" in sources
    assert "Signed-By: /etc/apt/keyrings/sovereign-archive.gpg\n" in sources
    assert (node / "etc/apt/keyrings/sovereign-archive.gpg").read_bytes() == (
        into / "debian/archive-keyring.gpg"
    ).read_bytes()
    # The archive's secret key is kept outside the served directory, private.
    secret = tmp_path / "config/sovereign/bundle/apt-archive/radiology-ward/archive-key.asc"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in into.rglob("*") if p.is_file() and b"PGP PRIVATE KEY" in p.read_bytes()]
    model = into / "models/models/qwen2.5-7b-instruct-awq"
    checked = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"],
        cwd=model, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert sorted(p.name for p in model.iterdir()) == [
        "README.md", "SHA256SUMS", "config.json", "model.safetensors",
    ]  # fmt: skip
    assert (into / "node-image/disk.raw").read_bytes() == b"disk"
    assert (into / "config/profile.yaml").is_file()
    assert (into / "ansible/playbooks").is_dir()
    assert (into / "policies").is_dir()


def _registry_down_stops_the_import_first(bundle: Path, trust: str, into: Path) -> None:
    down = f"127.0.0.1:{free_port()}"
    code, _, complaint = _invoke(
        "bundle", "import", str(bundle), "--trust", trust, "--into", str(into), "--registry", down
    )
    assert code == 1
    assert f"error: import into {into} stopped: oci-image: GET http://{down}/v2/" in complaint
    assert "Written before it, and intact: nothing" in complaint
    assert sorted(p.name for p in into.iterdir()) == [".sovereign"]
    assert not (into / ".sovereign/import.json").exists()


def _tampered_wheel_is_refused(bundle: Path, trust: str, into: Path) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    wheel = next(a for a in manifest["artifacts"] if a["kind"] == "wheel")
    blob = f"blobs/sha256/{wheel['files'][0]['digest'][7:]}"
    (bundle / blob).write_bytes(b"PK\3\4 not the wheel that was signed")
    code, _, complaint = _invoke(
        "bundle", "import", str(bundle), "--trust", trust, "--into", str(into)
    )
    assert code == 1
    assert f"✗ {blob}: content is sha256:" in complaint
    assert "nothing was imported" in complaint
    assert not into.exists()
