"""Image layers: the same files give the same bytes, whenever they were written."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from sovereign.distribution.layers import layer_from_directory, layer_from_tar

EPOCH = 1_796_083_200


def _tree(root: Path, mtime: int, owner: int) -> None:
    venv = root / "opt" / "sovereign" / "gateway"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib-b").mkdir()
    (venv / "lib").mkdir()
    (venv / "lib" / "module.py").write_text("print('x')\n")
    (venv / "bin" / "python").symlink_to("/usr/bin/python3.11")
    (venv / "bin" / "tool").write_text("#!/bin/sh\n")
    os.link(venv / "bin" / "tool", venv / "bin" / "tool-again")
    (root / "etc").mkdir()
    (root / "etc" / "outside.conf").write_text("not in the layer\n")
    for path in [*root.rglob("*"), root]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
        os.chown(path, owner, owner, follow_symlinks=False)


def test_the_same_files_give_the_same_layer(tmp_path: Path) -> None:
    _tree(tmp_path / "a", EPOCH + 86_400, 1000)
    _tree(tmp_path / "b", EPOCH + 3 * 86_400, 1000)
    first = layer_from_directory(
        tmp_path / "a", tmp_path / "a.tar", EPOCH, "/opt/sovereign/gateway"
    )
    second = layer_from_directory(
        tmp_path / "b", tmp_path / "b.tar", EPOCH, "/opt/sovereign/gateway"
    )
    assert first == second
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_a_subtree_layer_holds_its_parents_in_tree_order_and_nothing_else(tmp_path: Path) -> None:
    _tree(tmp_path / "root", EPOCH + 86_400, 1000)
    layer_from_directory(tmp_path / "root", tmp_path / "layer.tar", EPOCH, "/opt/sovereign/gateway")
    with tarfile.open(tmp_path / "layer.tar") as archive:
        members = archive.getmembers()
    assert [member.name for member in members] == [
        "opt",
        "opt/sovereign",
        "opt/sovereign/gateway",
        "opt/sovereign/gateway/bin",
        "opt/sovereign/gateway/bin/python",
        "opt/sovereign/gateway/bin/tool",
        "opt/sovereign/gateway/bin/tool-again",
        "opt/sovereign/gateway/lib",
        "opt/sovereign/gateway/lib/module.py",
        "opt/sovereign/gateway/lib-b",
    ]
    assert {member.mtime for member in members} == {EPOCH}
    assert {(member.uid, member.uname) for member in members} == {(1000, "")}
    again = next(member for member in members if member.name.endswith("tool-again"))
    assert again.islnk()
    assert again.linkname == "opt/sovereign/gateway/bin/tool"


def test_a_root_file_system_tar_is_normalised_the_same_way(tmp_path: Path) -> None:
    _tree(tmp_path / "root", EPOCH - 10, 0)
    with tarfile.open(tmp_path / "rootfs.tar", "w") as original:
        original.add(tmp_path / "root", arcname=".")
    layer_from_tar(tmp_path / "rootfs.tar", tmp_path / "layer.tar", EPOCH)
    with tarfile.open(tmp_path / "layer.tar") as archive:
        names = archive.getnames()
        kept = {member.mtime for member in archive.getmembers()}
    assert names[:2] == ["etc", "etc/outside.conf"]
    assert "." not in names
    assert not any(name.startswith("./") for name in names)
    assert kept == {EPOCH - 10}  # earlier than the epoch: kept as it was
