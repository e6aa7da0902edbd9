"""Values derived from profile fields, shared by the rules and the renderers that use them.

Kept apart from the renderers so the rules can refuse a profile for the same reason a
renderer would fail on it, without importing the renderers.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath

# Where `sovereign bundle import` places artifacts: `bundle:<path>` names <path> below it.
BUNDLE_ROOT = "/var/lib/sovereign/bundle"

DNS_LABEL_MAX = 63
_NOT_IN_LABEL = re.compile(r"[^a-z0-9-]+")
_HASH_CHARS = 8


def dns_label(prefix: str, name: str) -> str:
    """`{prefix}-{name}` as an RFC 1035 label: lower case, each run of other characters
    as one `-`; when longer than 63 characters, cut short and ended with a digest of
    `name`, so long names that share a beginning still get different labels.

    `prefix` must itself be a valid label that starts with a letter.
    """
    slug = _NOT_IN_LABEL.sub("-", name.lower()).strip("-")
    label = f"{prefix}-{slug}" if slug else prefix
    if len(label) <= DNS_LABEL_MAX:
        return label
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]
    head = label[: DNS_LABEL_MAX - _HASH_CHARS - 1].rstrip("-")
    return f"{head}-{digest}"


def local_weights_path(source: str) -> str:
    """The absolute path of a weights directory named `bundle:<relative path>` or
    `file:/<absolute path>`; ValueError for any other source."""
    scheme, _, rest = source.partition(":")
    path = PurePosixPath(rest)
    if scheme == "bundle":
        if not rest or path.is_absolute() or ".." in path.parts:
            raise ValueError(
                f"bundle:<path> names a path inside the imported bundle, relative and "
                f"without '..'; got {source!r}"
            )
        return str(PurePosixPath(BUNDLE_ROOT) / path)
    if scheme == "file":
        if not path.is_absolute() or ".." in path.parts:
            raise ValueError(f"file:<path> needs an absolute path without '..'; got {source!r}")
        return str(path)
    raise ValueError(
        f"vLLM loads a weights directory from bundle:<path> or file:/<path>; got {source!r}"
    )
