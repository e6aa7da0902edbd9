"""OIDC bearer-token authentication, as a Starlette `AuthenticationBackend` (RFC 6750, 8725).

Takes a request's `Authorization` header; gives `AuthCredentials` (the roles) and a
`Principal`, or raises `AuthError`, which the guard turns into 401 with a challenge.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from jwt import PyJWK
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.requests import HTTPConnection

from sovereign_gateway.contract import OIDC

# A kid is an opaque name, never a path or URL: anything else is refused before lookup.
_KID = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")
# Which JWK key types may carry each allowed algorithm (stops RSA/EC/OKP mix-ups).
_KEY_TYPES = {"RS256": "RSA", "ES256": "EC", "EdDSA": "OKP"}
# Access tokens only: Keycloak marks them typ=Bearer (ID and refresh tokens say ID/Refresh);
# RFC 9068 tokens say so in the header instead.
_ACCESS_TOKEN_TYP = "Bearer"  # noqa: S105 (a token type, not a secret)
_ACCESS_TOKEN_HEADER_TYP = "at+jwt"  # noqa: S105
# Verified tokens are remembered (a signature check costs more than the rest of the
# request's auth); bounded so a flood of distinct tokens cannot grow memory.
VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Principal(BaseUser):
    sub: str
    client: str | None
    roles: tuple[str, ...]
    service: bool

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.sub

    @property
    def identity(self) -> str:
        return self.sub


class AuthError(AuthenticationError):
    """A request that is not authenticated; `error` is the RFC 6750 error code."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description

    def challenge(self, realm: str) -> str:
        description = self.description.replace('"', "'")
        return f'Bearer realm="{realm}", error="{self.error}", error_description="{description}"'


class KeySourceError(Exception):
    """The issuer's keys cannot be fetched; requests are refused (503) until they can."""


class JWKSCache:
    """The issuer's signing keys by kid, refetched on expiry or, rate-limited, on a new kid."""

    def __init__(self, oidc: OIDC, client: httpx.AsyncClient, jwks_file: Path | None) -> None:
        self._oidc = oidc
        self._client = client
        self._jwks_file = jwks_file
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = 0.0
        self._attempted_at = float("-inf")
        self._jwks_uri: str | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key(self, kid: str) -> PyJWK | None:
        now = time.monotonic()
        if self._keys and now - self._fetched_at < self._oidc.jwks_cache_seconds:
            found = self._keys.get(kid)
            if found is not None:
                return found
        async with self._lock:
            found = self._keys.get(kid)
            fresh = now - self._fetched_at < self._oidc.jwks_cache_seconds
            if found is not None and fresh:
                return found
            if time.monotonic() - self._attempted_at < self._oidc.jwks_refetch_interval_seconds:
                return found if fresh else None
            await self.refresh()
            return self._keys.get(kid)

    def holds(self, kid: str) -> bool:
        return kid in self._keys

    def fresh(self) -> bool:
        return bool(self._keys) and (
            time.monotonic() - self._fetched_at < self._oidc.jwks_cache_seconds
        )

    async def refresh(self) -> None:
        self._attempted_at = time.monotonic()
        document = await self._load()
        keys: dict[str, PyJWK] = {}
        for entry in document.get("keys", []):
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            kid, alg = entry.get("kid"), entry.get("alg")
            if not isinstance(kid, str) or alg not in self._oidc.algorithms:
                continue
            try:
                keys[kid] = PyJWK(entry, algorithm=alg)
            except jwt.PyJWTError:
                continue
        self._keys = keys
        self._fetched_at = time.monotonic()
        self.fetches += 1

    async def _load(self) -> dict[str, Any]:
        if self._jwks_file is not None:
            try:
                return _as_object(json.loads(self._jwks_file.read_bytes()), str(self._jwks_file))
            except (OSError, ValueError) as exc:
                raise KeySourceError(
                    f"cannot read the local JWKS {self._jwks_file}: {exc}"
                ) from exc
        try:
            if self._jwks_uri is None:
                self._jwks_uri = await self._discover()
            response = await self._client.get(self._jwks_uri)
            response.raise_for_status()
            return _as_object(response.json(), self._jwks_uri)
        except (httpx.HTTPError, ValueError) as exc:
            raise KeySourceError(f"cannot fetch the issuer's keys: {exc}") from exc

    async def _discover(self) -> str:
        url = f"{self._oidc.issuer}/.well-known/openid-configuration"
        response = await self._client.get(url)
        response.raise_for_status()
        document = _as_object(response.json(), url)
        if document.get("issuer") != self._oidc.issuer:
            raise KeySourceError(
                f"discovery at {url} names issuer {document.get('issuer')!r}, "
                f"not {self._oidc.issuer!r}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise KeySourceError(f"discovery at {url} has no jwks_uri")
        return jwks_uri


def _as_object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not a JSON object")
    return value


class OIDCBackend(AuthenticationBackend):
    """Every request must carry a valid access token: none at all is refused, not anonymous."""

    def __init__(self, oidc: OIDC, client: httpx.AsyncClient, jwks_file: Path | None) -> None:
        self._oidc = oidc
        self.keys = JWKSCache(oidc, client, jwks_file)
        # token -> (principal, kid, exp): reused only while unexpired and its key is still
        # in the issuer's JWKS, so key removal still revokes at the next JWKS refresh.
        self._verified: dict[str, tuple[Principal, str, float]] = {}

    async def ready(self) -> tuple[bool, str]:
        # Only a stale cache is refetched: /health is polled, and a fetch here would also
        # use up the unknown-kid refetch allowance that key rotation depends on.
        if not self.keys.fresh():
            try:
                await self.keys.refresh()
            except KeySourceError as exc:
                return False, str(exc)
        return True, f"issuer {self._oidc.issuer} ({self._oidc.provider})"

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, Principal]:
        principal = await self.verify(conn.headers.get("authorization"))
        return AuthCredentials(list(principal.roles)), principal

    async def verify(self, authorization: str | None) -> Principal:
        token = _bearer_token(authorization)
        remembered = self._verified.get(token)
        if remembered is not None:
            known, signed_by, expires = remembered
            fresh = time.time() < expires + self._oidc.clock_skew_seconds
            if fresh and self.keys.holds(signed_by):
                return known
            del self._verified[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("invalid_token", "the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in self._oidc.algorithms:
            raise AuthError("invalid_token", f"signature algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise AuthError("invalid_token", "the token has no usable key id (kid)")
        key = await self.keys.key(kid)
        if key is None or key.key_type != _KEY_TYPES[alg]:
            raise AuthError("invalid_token", "the token is signed by an unknown key")
        # jku, x5u, jwk and x5c headers are never consulted: the key comes from the issuer only.
        claims = self._decode(token, key, alg)
        typ = claims.get("typ")
        if typ != _ACCESS_TOKEN_TYP and header.get("typ") != _ACCESS_TOKEN_HEADER_TYP:
            raise AuthError("invalid_token", "the token is not an access token")
        principal = self._principal(claims)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, kid, float(claims["exp"]))
        return principal

    def _decode(self, token: str, key: PyJWK, alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._oidc.audience,
                issuer=self._oidc.issuer,
                leeway=self._oidc.clock_skew_seconds,
                options={"require": ["exp", "iat", "iss", "aud", "sub"], "strict_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("invalid_token", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("invalid_token", "the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise AuthError("invalid_token", "the token is not meant for this audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("invalid_token", "the token comes from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("invalid_token", f"the token lacks the {exc.claim} claim") from None
        except jwt.PyJWTError:
            raise AuthError("invalid_token", "the token signature or claims are invalid") from None
        iat = claims["iat"]
        if not isinstance(iat, int | float) or iat > time.time() + self._oidc.clock_skew_seconds:
            raise AuthError("invalid_token", "the token is issued in the future")
        return claims

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        client = claims.get("azp") or claims.get("client_id")
        client = client if isinstance(client, str) else None
        roles: set[str] = set()
        roles.update(_strings(_get(claims, "realm_access", "roles")))
        roles.update(_strings(_get(claims, "resource_access", self._oidc.audience, "roles")))
        roles.update(_strings(claims.get("roles")))
        roles.update(group.lstrip("/") for group in _strings(claims.get("groups")))
        return Principal(
            sub=str(claims["sub"]),
            client=client,
            roles=tuple(sorted(roles)),
            service=client is not None and client in self._oidc.service_clients,
        )


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("invalid_request", "a bearer token is required")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError("invalid_request", "the Authorization header must be 'Bearer <token>'")
    return token


def _get(claims: Mapping[str, Any], *path: str) -> object:
    value: object = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _strings(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str)]
