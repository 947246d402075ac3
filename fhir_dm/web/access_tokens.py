"""SMART access tokens as an EHR's authorization server issues them.

The authorization server is found where SMART App Launch puts it: the FHIR server's
`.well-known/smart-configuration` (`issuer`, `jwks_uri`, `introspection_endpoint`). A JWT
access token is verified against that JWKS (PyJWT's `PyJWKClient`); any other token (or a JWT
the keys cannot verify) is asked about through RFC 7662 token introspection when the service
has introspection credentials. Access tokens are bearer tokens, used many times until they
expire: there is no `jti` replay check and no limit on the token's age, only `exp`/`nbf` with
a small leeway. Each result is cached until the token expires (bounded, keyed by a SHA-256
digest of the token; the token itself is never kept or logged).

Usage::

    verifier = AccessTokenVerifier(SmartTrust(), fhir_base_url="https://ehr.example.org/fhir",
                                   session=requests.Session())
    grant = verifier.verify(token)   # AccessGrant(scopes=..., patient="123", ...) or AuthError
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import requests
from cachetools import TLRUCache, TTLCache
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from fhir_dm.common.errors import AuthError, UpstreamUnavailableError
from fhir_dm.web.scopes import Scope, parse_scopes

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Json = dict[str, Any]

SMART_CONFIGURATION_PATH = "/.well-known/smart-configuration"
ACCESS_TOKEN_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
DEFAULT_ACCESS_TOKEN_ALGORITHMS = ("RS256", "RS384", "ES256", "ES384")
HTTP_TIMEOUT_SECONDS = 5.0
MAX_DOCUMENT_BYTES = 512 * 1024
MAX_TOKEN_BYTES = 16 * 1024
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def secure_url(url: str, what: str) -> str:
    """https, or plain http on loopback only (a key set or token answer must not be swapped)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS:
        return url
    raise ValueError(f"{what} must be https (http only for localhost): {url!r}")


class IntrospectionClient(BaseModel):
    """The service's own client credentials at the authorization server, for RFC 7662 calls.

    Usage::

        IntrospectionClient(client_id="fhir-dm", client_secret="<secret>")
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str = Field(min_length=1, description="The service's client id for introspection.")
    client_secret: SecretStr = Field(description="Its secret (HTTP Basic at the endpoint).")
    endpoint: str | None = Field(
        default=None,
        description="The introspection endpoint; default: `introspection_endpoint` of the "
        "smart-configuration.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_secure(cls, value: str | None) -> str | None:
        return None if value is None else secure_url(value, "introspection endpoint")


class SmartTrust(BaseModel):
    """Where the EHR's authorization server is and what its access tokens must say.

    Usage::

        SmartTrust()     # everything from {fhir.base_url}/.well-known/smart-configuration
        SmartTrust(audiences=("https://dm.example.org",),
                   introspection=IntrospectionClient(client_id="fhir-dm", client_secret="..."))

    `audiences` empty means the FHIR server's base URL: the `aud` the SMART app asks for.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    smart_configuration_url: str | None = Field(
        default=None,
        description="Where the authorization server is described; default: the FHIR server's "
        "`.well-known/smart-configuration`.",
    )
    issuer: str | None = Field(
        default=None,
        description="The `iss` JWT access tokens must carry; default: the smart-configuration's "
        "`issuer` (unchecked when neither is known).",
    )
    jwks_uri: str | None = Field(
        default=None, description="The key set; default: the smart-configuration's `jwks_uri`."
    )
    audiences: tuple[str, ...] = Field(
        default=(),
        description="Accepted `aud` values (any one): the FHIR server's base URL when empty; "
        "add `public_base_url` for tokens issued for the service itself.",
    )
    algorithms: tuple[str, ...] = Field(
        default=DEFAULT_ACCESS_TOKEN_ALGORITHMS,
        description="Signature algorithms accepted for JWT access tokens (asymmetric only).",
    )
    introspection: IntrospectionClient | None = Field(
        default=None,
        description="Credentials for RFC 7662 introspection (opaque tokens); off when unset.",
    )
    leeway_seconds: int = Field(
        default=30, ge=0, le=300, description="Clock skew allowed on `exp` and `nbf`."
    )
    cache_size: int = Field(
        default=10000, gt=0, description="Verified tokens remembered (by digest) at most."
    )
    max_cache_seconds: int = Field(
        default=3600, gt=0, description="A verified token is re-checked after this long at most."
    )
    discovery_cache_seconds: int = Field(
        default=3600, gt=0, description="How long the smart-configuration and keys are reused."
    )

    @field_validator("smart_configuration_url", "jwks_uri")
    @classmethod
    def _urls_are_secure(cls, value: str | None) -> str | None:
        return None if value is None else secure_url(value, "authorization server URL")

    @field_validator("algorithms")
    @classmethod
    def _only_asymmetric(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        allowed = ", ".join(sorted(ACCESS_TOKEN_ALGORITHMS))
        if not value:
            raise ValueError(f"algorithms must list at least one of {allowed}")
        for alg in value:
            if alg not in ACCESS_TOKEN_ALGORITHMS:
                raise ValueError(
                    f"algorithm {alg!r} is not allowed for access tokens; use {allowed}"
                )
        return tuple(dict.fromkeys(value))


@dataclass(frozen=True, slots=True)
class AccessGrant:
    """What a verified access token grants; never holds the token."""

    issuer: str | None
    subject: str | None
    client_id: str | None
    scopes: tuple[Scope, ...]
    patient: str | None
    fhir_user: str | None
    expires_at: float
    via: str  # "jwt" or "introspection"


def token_digest(token: str) -> str:
    """The cache key and log handle of a token: its SHA-256, never the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _JwkClient(jwt.PyJWKClient):
    """PyJWKClient fetching through `requests` (proxies, size limit, no redirects, mockable)."""

    def __init__(self, uri: str, session: requests.Session, lifespan: float) -> None:
        super().__init__(uri, cache_keys=False, lifespan=lifespan, timeout=HTTP_TIMEOUT_SECONDS)
        self._session = session

    def fetch_data(self) -> Any:
        try:
            document = get_small_json(self._session, self.uri)
        except AuthError as exc:
            raise jwt.PyJWKClientConnectionError(exc.message) from None
        if self.jwk_set_cache is not None:
            self.jwk_set_cache.put(document)
        self._last_successful_fetch = time.monotonic()
        return document


def get_small_json(
    session: requests.Session,
    url: str,
    *,
    timeout: float = HTTP_TIMEOUT_SECONDS,
    max_bytes: int = MAX_DOCUMENT_BYTES,
) -> Json:
    """GET a small JSON object (no redirects, size-capped while reading).

    AuthError with a short reason on any failure, for the caller to put in context.
    """
    try:
        with session.get(
            url,
            timeout=timeout,
            headers={"Accept": "application/json"},
            allow_redirects=False,
            stream=True,
        ) as response:
            if response.status_code != 200:
                raise AuthError(f"returned {response.status_code}")
            body = bytearray()
            for chunk in response.iter_content(chunk_size=16384):
                body.extend(chunk)
                if len(body) > max_bytes:
                    raise AuthError("answer too large")
    except requests.RequestException:
        raise AuthError("unreachable") from None
    try:
        document = json.loads(bytes(body))
    except ValueError:
        raise AuthError("answer is not JSON") from None
    if not isinstance(document, dict):
        raise AuthError("answer is not a JSON object")
    return document


def strip_slash(url: str) -> str:
    return url[:-1] if url.endswith("/") else url


def audience_matches(aud: Any, expected: tuple[str, ...]) -> bool:
    """`aud` (a string, or an array of strings per RFC 7519) names one of `expected`."""
    values = aud if isinstance(aud, list) else [aud]
    wanted = {strip_slash(url) for url in expected}
    return any(isinstance(value, str) and strip_slash(value) in wanted for value in values)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(f"access token rejected: {name} not a number")
    return float(value)


def _text(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) and value else None


def _scope_claim(claims: Mapping[str, Any]) -> tuple[Scope, ...]:
    """`scope` (a space-separated string, RFC 8693/9068) or `scp` (a list, some servers)."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        return parse_scopes(scope)
    scp = claims.get("scp")
    if isinstance(scp, list):
        return parse_scopes(scp)
    if isinstance(scp, str):
        return parse_scopes(scp)
    return ()


class AccessTokenVerifier:
    """Verifies SMART access tokens (JWT or introspected) and caches what they grant.

    Every failure raises AuthError (401) with a short reason; an authorization server that
    cannot be reached raises UpstreamUnavailableError (503), since the token may be fine.
    """

    def __init__(
        self,
        config: SmartTrust,
        *,
        fhir_base_url: str,
        session: requests.Session,
        clock: Clock = time.time,
    ) -> None:
        self._config = config
        self._session = session
        self._clock = clock
        self._configuration_url = config.smart_configuration_url or (
            strip_slash(fhir_base_url) + SMART_CONFIGURATION_PATH
        )
        self._audiences = config.audiences or (fhir_base_url,)
        self._lock = threading.Lock()
        self._discovered: TTLCache[str, Json] = TTLCache(
            maxsize=1, ttl=config.discovery_cache_seconds, timer=clock
        )
        self._jwk_clients: dict[str, _JwkClient] = {}
        # Each entry lives until its own token expires (TLRU: time-aware, least recently used).
        self._grants: TLRUCache[str, AccessGrant] = TLRUCache(
            maxsize=config.cache_size, ttu=self._cache_until, timer=clock
        )

    def _cache_until(self, _key: str, grant: AccessGrant, now: float) -> float:
        return min(grant.expires_at, now + self._config.max_cache_seconds)

    def verify(self, token: str) -> AccessGrant:
        """What `token` grants; AuthError when it is not a valid, unexpired access token."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AuthError("access token rejected: empty or too large")
        key = token_digest(token)
        with self._lock:
            cached = self._grants.get(key)
        if cached is not None:
            return cached
        try:
            grant = self._check(token)
        except AuthError as exc:
            logger.warning("%s (token sha256 %s)", exc.message, key[:12])
            raise
        with self._lock:
            self._grants[key] = grant
        return grant

    def _check(self, token: str) -> AccessGrant:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            header = None
        if header is None:
            return self._introspect(token, reason="access token rejected: not a JWT")
        try:
            return self._verify_jwt(token, header)
        except AuthError as exc:
            return self._introspect(token, reason=exc.message)

    # -- discovery -------------------------------------------------------------------------
    def configuration(self) -> Json:
        """The smart-configuration (cached); 503 when the FHIR server does not give it."""
        with self._lock:
            document = self._discovered.get("doc")
            if document is not None:
                return document
            try:
                document = get_small_json(self._session, self._configuration_url)
            except AuthError as exc:
                logger.warning("smart-configuration unavailable: %s", exc.message)
                raise UpstreamUnavailableError(
                    "the authorization server's smart-configuration cannot be read "
                    f"({exc.message}): access tokens cannot be checked"
                ) from None
            self._discovered["doc"] = document
            return document

    def _discovered_url(self, name: str) -> str | None:
        value = self.configuration().get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise UpstreamUnavailableError(f"the smart-configuration's {name} is not a URL")
        try:
            return secure_url(value, name)
        except ValueError as exc:
            raise UpstreamUnavailableError(str(exc)) from None

    def _issuer(self) -> str | None:
        if self._config.issuer is not None:
            return self._config.issuer
        issuer = self.configuration().get("issuer")
        return issuer if isinstance(issuer, str) else None

    def _jwk_client(self) -> _JwkClient | None:
        uri = self._config.jwks_uri or self._discovered_url("jwks_uri")
        if uri is None:
            return None
        with self._lock:
            client = self._jwk_clients.get(uri)
            if client is None:
                client = _JwkClient(uri, self._session, self._config.discovery_cache_seconds)
                self._jwk_clients[uri] = client
            return client

    # -- JWT access tokens -----------------------------------------------------------------
    def _verify_jwt(self, token: str, header: Mapping[str, Any]) -> AccessGrant:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            raise AuthError("access token rejected: alg not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("access token rejected: kid missing")
        client = self._jwk_client()
        if client is None:
            raise AuthError("access token rejected: the authorization server publishes no keys")
        try:
            key = client.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError:
            raise UpstreamUnavailableError(
                "the authorization server's key set cannot be read"
            ) from None
        except jwt.PyJWTError:
            raise AuthError("access token rejected: kid unknown") from None
        try:
            # The raw key with the header's (allowed) algorithm: PyJWK alone would assume RS256
            # for an RSA key published without `alg`; a key of the wrong type is refused.
            claims: Json = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                options={
                    "require": ["exp", "aud"],
                    # Times and audience are checked below, with the injected clock and the
                    # trailing-slash rule.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"access token rejected: claim {exc.claim} missing") from None
        except jwt.InvalidSignatureError:
            raise AuthError("access token rejected: signature invalid") from None
        except jwt.PyJWTError:
            raise AuthError("access token rejected: token invalid") from None
        issuer = self._issuer()
        if issuer is not None and strip_slash(str(claims.get("iss"))) != strip_slash(issuer):
            raise AuthError("access token rejected: iss is not the authorization server")
        return self._grant(claims, via="jwt", exp_required=True)

    def _grant(self, claims: Mapping[str, Any], *, via: str, exp_required: bool) -> AccessGrant:
        """Check times and audience (no age limit, no replay check) and read the grant."""
        now = self._clock()
        leeway = self._config.leeway_seconds
        exp = _number(claims, "exp")
        if exp is None:
            if exp_required:
                raise AuthError("access token rejected: claim exp missing")
            exp = now + self._config.max_cache_seconds
        if now > exp + leeway:
            raise AuthError("access token rejected: expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise AuthError("access token rejected: not yet valid")
        if ("aud" in claims or via == "jwt") and not audience_matches(
            claims.get("aud"), self._audiences
        ):
            raise AuthError("access token rejected: aud is not the FHIR server or the service")
        return AccessGrant(
            issuer=_text(claims, "iss"),
            subject=_text(claims, "sub"),
            client_id=_text(claims, "client_id") or _text(claims, "azp"),
            scopes=_scope_claim(claims),
            patient=_text(claims, "patient"),
            fhir_user=_text(claims, "fhirUser"),
            expires_at=exp,
            via=via,
        )

    # -- introspection (RFC 7662) ----------------------------------------------------------
    def _introspect(self, token: str, *, reason: str) -> AccessGrant:
        """Ask the authorization server; without introspection credentials, refuse (`reason`)."""
        client = self._config.introspection
        if client is None:
            raise AuthError(reason)
        endpoint = client.endpoint or self._discovered_url("introspection_endpoint")
        if endpoint is None:
            raise AuthError(reason + "; the authorization server offers no introspection")
        try:
            response = self._session.post(
                endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                auth=(client.client_id, client.client_secret.get_secret_value()),
                headers={"Accept": "application/json"},
                timeout=HTTP_TIMEOUT_SECONDS,
                allow_redirects=False,
            )
        except requests.RequestException:
            raise UpstreamUnavailableError(
                "the authorization server's introspection endpoint cannot be reached"
            ) from None
        if response.status_code != 200:
            logger.warning("introspection answered %d", response.status_code)
            raise UpstreamUnavailableError(
                f"the authorization server's introspection answered {response.status_code}"
            )
        try:
            answer = response.json()
        except ValueError:
            raise UpstreamUnavailableError("the introspection answer is not JSON") from None
        if not isinstance(answer, dict) or answer.get("active") is not True:
            raise AuthError("access token rejected: not active (introspection)")
        token_type = answer.get("token_type")
        if isinstance(token_type, str) and token_type.lower() not in ("bearer", "access_token"):
            raise AuthError("access token rejected: not an access token (introspection)")
        return self._grant(answer, via="introspection", exp_required=False)
