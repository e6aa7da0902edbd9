"""The model mirror's pure parts: sources and pinning, git-lfs pointers, git blob ids and
clones, the licence a card states, and what the hub's listing and headers must say."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sovereign.mirror.fetch import MirrorError
from sovereign.mirror.models import (
    HubSource,
    LfsPointer,
    LocalSource,
    check_repo_commit,
    determine_licence,
    front_matter,
    git_blob_id,
    git_blob_id_file,
    git_origin,
    hub_files,
    huggingface_purl,
    licence_warnings,
    parse_pointer,
    parse_source,
    pinned_commit,
    read_pointer,
    selected,
    spdx_expression,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OID = hashlib.sha256(b"weights").hexdigest()
POINTER = f"version https://git-lfs.github.com/spec/v1\noid sha256:{OID}\nsize 7\n".encode()


# Sources and pinning


def test_hf_sources_name_the_repository_revision_and_optional_file() -> None:
    assert parse_source(f"hf:acme/tiny-model@{COMMIT}/q4/model.gguf") == HubSource(
        "acme/tiny-model", COMMIT, "q4/model.gguf"
    )
    assert parse_source(f"hf:acme/tiny-model@{COMMIT}") == HubSource(
        "acme/tiny-model", COMMIT, None
    )
    assert parse_source("hf:acme/tiny-model") == HubSource("acme/tiny-model", None, None)
    assert parse_source("file:/models/tiny.gguf") == LocalSource(Path("/models/tiny.gguf"))


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("hf:tiny-model@main", "expected hf:<org>/<repo>"),
        (f"hf:acme/tiny@{COMMIT}/../../etc/passwd", "not a relative path"),
        ("file:models/tiny.gguf", "absolute path"),
        ("file:/models/../etc/passwd", "without '..'"),
        ("pkg:minilm/model.onnx", "sovereign tools install"),
        ("bundle:models/x.gguf", "already in an imported bundle"),
        ("http://10.0.0.5:8000/v1", "hf: and file:"),
    ],
)
def test_other_sources_are_refused_with_the_reason(source: str, says: str) -> None:
    with pytest.raises(MirrorError) as caught:
        parse_source(source)
    assert says in str(caught.value)


def test_only_a_full_commit_counts_as_pinned() -> None:
    assert pinned_commit(COMMIT) == COMMIT
    assert pinned_commit(COMMIT.upper()) == COMMIT  # the purl wants it lower-cased
    assert pinned_commit("main") is None
    assert pinned_commit(COMMIT[:7]) is None  # a short sha can become ambiguous
    assert pinned_commit(COMMIT + "0") is None
    assert pinned_commit(None) is None


def test_the_purl_is_the_huggingface_type_with_the_lower_case_commit() -> None:
    assert huggingface_purl("Acme/Tiny-Model", COMMIT.upper()) == (
        f"pkg:huggingface/Acme/Tiny-Model@{COMMIT}"
    )


def test_the_filter_keeps_the_named_file_what_allow_matches_and_always_card_and_licence() -> None:
    allow = ["*.gguf", "config.json"]
    assert selected("tiny.Q4_K_M.gguf", allow, None)
    assert selected("config.json", allow, None)
    assert not selected("pytorch_model.bin", allow, None)
    assert selected("README.md", allow, None)
    assert selected("LICENSE.txt", allow, None)
    # a source that names one file takes that file (and the card), not the whole repo
    assert selected("model-q4.gguf", None, "model-q4.gguf")
    assert not selected("model-q8.gguf", None, "model-q4.gguf")
    assert selected("README.md", None, "model-q4.gguf")
    assert selected("anything/at/all.bin", None, None)


# git-lfs pointers and git blob ids


def test_a_git_lfs_pointer_gives_its_objects_sha256_and_size() -> None:
    assert parse_pointer(POINTER) == LfsPointer(OID, 7)
    with_extension = POINTER.replace(b"oid", b"ext-0-foo sha256:" + b"1" * 64 + b"\noid")
    assert parse_pointer(with_extension) == LfsPointer(OID, 7)


@pytest.mark.parametrize(
    "data",
    [
        b'{"architectures": ["LlamaForCausalLM"]}',
        b"GGUF\x03\x00\x00\x00" + bytes(range(256)),
        POINTER.replace(OID.encode(), b"not-a-digest"),
        POINTER.replace(b"size 7", b"size seven"),
        POINTER.replace(b"version https", b"version http"),
        POINTER + b"x" * 1024,  # a pointer is under 1024 bytes; this is content
    ],
)
def test_anything_else_is_not_a_pointer(data: bytes) -> None:
    assert parse_pointer(data) is None


def test_a_large_file_is_not_read_to_look_for_a_pointer(tmp_path: Path) -> None:
    weights = tmp_path / "weights.gguf"
    weights.write_bytes(POINTER + b"\0" * 4096)
    pointer = tmp_path / "pointer.gguf"
    pointer.write_bytes(POINTER)
    assert read_pointer(weights) is None
    assert read_pointer(pointer) == LfsPointer(OID, 7)


def test_git_blob_ids_are_what_git_hash_object_gives(tmp_path: Path) -> None:
    # `printf 'hello\n' | git hash-object --stdin`
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    path = tmp_path / "config.json"
    path.write_bytes(b"hello\n")
    assert git_blob_id_file(path) == git_blob_id(b"hello\n")


def _clone(tmp_path: Path, head: str, config: str, refs: dict[str, str] | None = None) -> Path:
    git = tmp_path / "clone" / ".git"
    git.mkdir(parents=True)
    (git / "HEAD").write_text(head)
    (git / "config").write_text(config)
    for name, text in (refs or {}).items():
        (git / name).parent.mkdir(parents=True, exist_ok=True)
        (git / name).write_text(text)
    return git.parent


ORIGIN = '[core]\n\tbare = false\n[remote "origin"]\n\turl = https://huggingface.co/acme/tiny\n'


def test_a_clone_says_which_repository_and_commit_its_pointers_belong_to(tmp_path: Path) -> None:
    clone = _clone(tmp_path, "ref: refs/heads/main\n", ORIGIN, {"refs/heads/main": COMMIT})
    assert git_origin(clone) == ("acme/tiny", COMMIT)


def test_a_clone_with_packed_refs_and_an_scp_remote_is_read_too(tmp_path: Path) -> None:
    config = (
        '[remote "upstream"]\n\turl = x:y/z\n[remote "origin"]\n\turl = git@hf.co:acme/tiny.git\n'
    )
    packed = f"# pack-refs with: peeled\n{COMMIT} refs/heads/main\n"
    clone = _clone(tmp_path, "ref: refs/heads/main\n", config, {"packed-refs": packed})
    assert git_origin(clone) == ("acme/tiny", COMMIT)


def test_a_directory_that_is_no_clone_or_has_no_origin_names_no_repository(
    tmp_path: Path,
) -> None:
    assert git_origin(tmp_path) is None
    clone = _clone(tmp_path, COMMIT, '[remote "mirror"]\n\turl = https://hf.co/acme/tiny\n')
    assert git_origin(clone) is None


# The licence


CARD = """---
language: en
license: apache-2.0
tags: [gguf]
---
# Tiny model
"""


def test_the_card_front_matter_licence_becomes_an_spdx_id() -> None:
    assert front_matter(CARD)["license"] == "apache-2.0"
    licence = determine_licence(CARD, None, ["README.md", "config.json"], "acme/tiny")
    assert (licence.spdx, licence.stated, licence.file) == ("Apache-2.0", "apache-2.0", None)
    assert licence_warnings("acme/tiny", licence) == []


def test_an_other_licence_is_named_by_license_name_and_keeps_its_link() -> None:
    card = (
        "---\r\nlicense: other\r\nlicense_name: llama3\r\n"
        "license_link: LICENSE\r\n---\r\nThe Llama 3 model card\r\n"
    )
    licence = determine_licence(card, None, ["README.md", "LICENSE"], "acme/llama")
    assert licence.spdx == "LicenseRef-llama3"
    assert (licence.stated, licence.name, licence.link) == ("other", "llama3", "LICENSE")
    assert licence.file == "LICENSE"
    assert "not on the SPDX list" in licence_warnings("acme/llama", licence)[0]


@pytest.mark.parametrize(
    ("stated", "name", "spdx"),
    [
        ("mit", None, "MIT"),
        ("cc-by-nc-4.0", None, "CC-BY-NC-4.0"),
        ("llama3.1", None, "LicenseRef-llama3.1"),
        ("creativeml-openrail-m", None, "LicenseRef-creativeml-openrail-m"),
        (["apache-2.0", "mit"], None, "Apache-2.0 AND MIT"),
        ("other", "Acme Model Licence v1", "LicenseRef-Acme-Model-Licence-v1"),
        ("other", None, None),
        ("unknown", None, None),
        (["mit", "unknown"], None, None),
    ],
)
def test_hub_licence_ids_map_to_spdx(
    stated: str | list[str], name: str | None, spdx: str | None
) -> None:
    assert spdx_expression(stated, name) == spdx


def test_the_hubs_card_data_is_used_when_the_card_has_no_front_matter() -> None:
    licence = determine_licence("# Tiny\nNo metadata.\n", {"license": "mit"}, [], "acme/tiny")
    assert licence.spdx == "MIT"


def test_a_licence_file_alone_makes_its_text_the_licence() -> None:
    licence = determine_licence("# Tiny\n", {}, ["README.md", "LICENSE.txt"], "acme/tiny")
    assert licence.spdx == "LicenseRef-acme-tiny-LICENSE"
    assert licence.file == "LICENSE.txt"
    assert "the text of LICENSE.txt" in licence_warnings("acme/tiny", licence)[0]


@pytest.mark.parametrize(
    "card",
    [
        None,
        "# Tiny\n",
        "---\nlicense: [unclosed\n---\n",  # broken YAML: no licence, not an error
        "---\nlanguage: en\n---\n",
        "license: mit\n",  # not front matter: it does not start the card
    ],
)
def test_no_licence_anywhere_is_none_and_a_warning_says_the_sbom_will_not_know(
    card: str | None,
) -> None:
    licence = determine_licence(card, None, ["README.md", "model.gguf"], "acme/tiny")
    assert licence.spdx is None
    [warning] = licence_warnings("acme/tiny", licence)
    assert "no licence found" in warning
    assert "NOASSERTION" in warning


# What the hub's listing and headers must say


def _listing(*siblings: dict[str, object], sha: str = COMMIT) -> dict[str, object]:
    return {"id": "acme/tiny", "sha": sha, "siblings": list(siblings)}


def test_the_listing_gives_lfs_digests_and_blob_ids() -> None:
    files = hub_files(
        _listing(
            {"rfilename": "config.json", "size": 6, "blobId": "ce01" * 10},
            {
                "rfilename": "model.gguf",
                "size": 7,
                "blobId": "ab" * 20,
                "lfs": {"sha256": OID, "size": 7, "pointerSize": 128},
            },
        ),
        COMMIT,
        "listing",
    )
    assert [(f.path, f.blob_id, f.lfs) for f in files] == [
        ("config.json", "ce01" * 10, None),
        ("model.gguf", "ab" * 20, LfsPointer(OID, 7)),
    ]


@pytest.mark.parametrize(
    ("listing", "says"),
    [
        (_listing({"rfilename": "../../.bashrc", "blobId": "ab" * 20}), "not a relative path"),
        (_listing({"rfilename": "/etc/passwd", "blobId": "ab" * 20}), "not a relative path"),
        (_listing({"rfilename": "config.json", "size": 6}), "neither an LFS sha256 nor"),
        (_listing({"rfilename": "m.gguf", "lfs": {"sha256": "x", "size": 1}}), "not a sha256"),
        (_listing(sha="f" * 40), "not " + COMMIT),
        ({"error": "Repository not found"}, "no siblings"),
    ],
)
def test_a_listing_that_cannot_be_checked_is_refused(listing: object, says: str) -> None:
    with pytest.raises(MirrorError) as caught:
        hub_files(listing, COMMIT, "listing")
    assert says in str(caught.value)


def test_the_commit_the_hub_says_it_served_must_be_the_pinned_one() -> None:
    check_repo_commit({"X-Repo-Commit": COMMIT}, COMMIT, "url")
    check_repo_commit({}, COMMIT, "url")  # a plain file server says nothing; that is fine
    with pytest.raises(MirrorError, match=f"served commit {'f' * 40}, not the pinned {COMMIT}"):
        check_repo_commit({"X-Repo-Commit": "f" * 40}, COMMIT, "url")
