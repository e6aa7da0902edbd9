"""What a mirror hands to the bundle: one record per file or image it holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

ArtifactKind = Literal[
    "wheel", "oci-image", "deb", "model", "node-image", "policy", "roles", "config"
]


@dataclass(frozen=True)
class Artifact:
    kind: ArtifactKind
    name: str
    version: str
    # Relative to the mirror's directory. For an OCI image, its manifest's blob path.
    path: str
    sha256: str
    size: int
    source: str  # where it was fetched from, a URL or a local path
    licence: str | None  # an SPDX expression where the source states one
    purl: str | None = None  # the package URL the SBOM names it by

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        return cls(**data)
