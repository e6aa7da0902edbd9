"""The bundle's SBOM: CycloneDX 1.6 JSON, one component per artifact, made with
cyclonedx-python-lib and checked against the CycloneDX schema before it is written."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable

from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import (
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    XsUri,
)
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

from sovereign.bundle.layout import BundleError
from sovereign.mirror.artifact import Artifact

COMPONENT_TYPES = {
    "wheel": ComponentType.LIBRARY,
    "deb": ComponentType.LIBRARY,
    "oci-image": ComponentType.CONTAINER,
    "model": ComponentType.MACHINE_LEARNING_MODEL,
    "node-image": ComponentType.OPERATING_SYSTEM,
    "policy": ComponentType.DATA,
    "roles": ComponentType.DATA,
    "config": ComponentType.DATA,
}


def sbom_json(artifacts: Iterable[Artifact], bundle_name: str, created: datetime.datetime) -> str:
    """Components in a stable order; a licence no source stated is left out, which
    CycloneDX readers take as NOASSERTION."""
    licences = LicenseFactory()
    root = Component(name=bundle_name, type=ComponentType.APPLICATION, bom_ref="bundle")
    bom = Bom(
        serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"sovereign-bundle:{bundle_name}:{created}"),
        metadata=BomMetaData(timestamp=created, component=root),
    )
    seen: set[str] = set()
    for artifact in sorted(artifacts, key=lambda a: (a.kind, a.name, a.version, a.path)):
        ref = f"{artifact.kind}:{artifact.name}@{artifact.version}:{artifact.path}"
        if ref in seen:
            continue
        seen.add(ref)
        purl = PackageURL.from_string(artifact.purl) if artifact.purl else None
        bom.components.add(
            Component(
                name=artifact.name,
                version=artifact.version,
                type=COMPONENT_TYPES[artifact.kind],
                bom_ref=ref,
                purl=purl,
                hashes=[HashType(alg=HashAlgorithm.SHA_256, content=artifact.sha256)],
                licenses=[licences.make_from_string(artifact.licence)] if artifact.licence else [],
                external_references=[_distribution(artifact.source)],
                properties=[
                    Property(name="sovereign:kind", value=artifact.kind),
                    Property(name="sovereign:path", value=artifact.path),
                ],
            )
        )
    bom.register_dependency(root, bom.components)
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        raise BundleError(f"the SBOM does not validate against CycloneDX 1.6: {error}")
    return text + "\n"


def _distribution(source: str) -> ExternalReference:
    return ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(source))
