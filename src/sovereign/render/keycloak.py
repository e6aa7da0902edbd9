"""Renderer `keycloak`: the Keycloak realm (roles, users, clients) the gateway trusts.

Takes the profile's identity section; gives `keycloak/realm.json` for `kc.sh --import-realm`.
Nothing secret is rendered: users get no password and service clients no secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sovereign.profile.model import Profile
from sovereign.render import Renderer

# The public client people use to sign in (browser with PKCE, or the password grant for
# scripts); its tokens carry the gateway as audience.
CLI_CLIENT = "sovereign-cli"
ACCESS_TOKEN_LIFESPAN_S = 300
LOOPBACK_REDIRECTS = ["http://127.0.0.1/*", "http://localhost/*"]


def _audience_mapper(audience: str) -> dict[str, Any]:
    return {
        "name": f"audience {audience}",
        "protocol": "openid-connect",
        "protocolMapper": "oidc-audience-mapper",
        "consentRequired": False,
        "config": {
            "included.client.audience": audience,
            "access.token.claim": "true",
            "id.token.claim": "false",
            "introspection.token.claim": "true",
        },
    }


def realm(profile: Profile) -> dict[str, Any]:
    identity = profile.identity
    audience = identity.audience
    clients: list[dict[str, Any]] = [
        {
            "clientId": audience,
            "name": "SovereignStack gateway (resource server)",
            "enabled": True,
            "publicClient": False,
            "bearerOnly": True,
            "standardFlowEnabled": False,
            "directAccessGrantsEnabled": False,
            "serviceAccountsEnabled": False,
        },
        {
            "clientId": CLI_CLIENT,
            "name": "SovereignStack sign-in",
            "enabled": True,
            "publicClient": True,
            "standardFlowEnabled": True,
            "directAccessGrantsEnabled": True,
            "implicitFlowEnabled": False,
            "serviceAccountsEnabled": False,
            "redirectUris": LOOPBACK_REDIRECTS,
            "attributes": {"pkce.code.challenge.method": "S256"},
            "protocolMappers": [_audience_mapper(audience)],
        },
    ]
    users: list[dict[str, Any]] = []
    for client in identity.service_clients:
        clients.append(
            {
                "clientId": client.name,
                "name": f"service client {client.name}",
                "enabled": True,
                "publicClient": False,
                "clientAuthenticatorType": "client-secret",
                "serviceAccountsEnabled": True,
                "standardFlowEnabled": False,
                "directAccessGrantsEnabled": False,
                "implicitFlowEnabled": False,
                "protocolMappers": [_audience_mapper(audience)],
            }
        )
        users.append(
            {
                "username": f"service-account-{client.name}",
                "enabled": True,
                "serviceAccountClientId": client.name,
                "realmRoles": list(client.roles),
            }
        )
    for user in identity.users:
        entry: dict[str, Any] = {
            "username": user.name,
            "enabled": True,
            # Keycloak's default user profile requires names and e-mail before a first sign-in.
            "firstName": user.name,
            "lastName": identity.realm,
            "email": user.email,
            "emailVerified": True,
            "realmRoles": list(user.roles),
        }
        users.append(entry)
    return {
        "realm": identity.realm,
        "enabled": True,
        "sslRequired": "external",
        "accessTokenLifespan": ACCESS_TOKEN_LIFESPAN_S,
        "registrationAllowed": False,
        "bruteForceProtected": True,
        "roles": {
            "realm": [
                {"name": role, "description": f"gateway permissions: {', '.join(perms)}"}
                for role, perms in identity.roles.items()
            ]
        },
        "clients": clients,
        "users": users,
    }


def render(profile: Profile) -> Mapping[str, bytes]:
    if profile.identity.provider != "keycloak":
        return {}
    return {"keycloak/realm.json": json.dumps(realm(profile), indent=2).encode() + b"\n"}


RENDERER = Renderer("keycloak", "the Keycloak realm: roles, users and clients", render)
