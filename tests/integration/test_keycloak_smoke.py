"""The installed Keycloak starts in dev mode on 127.0.0.1 and serves OIDC discovery.

Takes the session's Keycloak (started once by the integration conftest); gives pass or fail.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from tests.integration.conftest import http

if TYPE_CHECKING:
    from tests.integration.conftest import Keycloak


@pytest.mark.slow
@pytest.mark.parametrize("realm", ["master", "sovereign", "other"])
def test_discovery_names_each_realm(keycloak: Keycloak, realm: str) -> None:
    status, _, body = http(
        "GET", f"{keycloak.base}/realms/{realm}/.well-known/openid-configuration"
    )
    discovery = json.loads(body)

    assert status == 200
    assert discovery["issuer"] == f"{keycloak.base}/realms/{realm}"
    assert str(discovery["jwks_uri"]).startswith(f"{keycloak.base}/realms/{realm}/")
    assert str(discovery["token_endpoint"]).startswith(f"{keycloak.base}/realms/{realm}/")
