"""How FHIR requests log in: no auth, a static bearer token, or SMART Backend Services."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from requests.auth import AuthBase

from fhir_dm.common import deadline as deadlines
from fhir_dm.common.errors import (
    KnowledgeError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
)
from fhir_dm.fhir.config import MAX_ASSERTION_LIFETIME_SECONDS, AuthConfig

__all__ = ["BearerAuth", "NoAuth", "SmartBackendAuth", "auth_from_config"]

_log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_EXPIRY_SKEW_SECONDS = 60.0
DEFAULT_TOKEN_TIMEOUT = (5.0, 30.0)
DEFAULT_EXPIRES_IN_SECONDS = 300.0  # when the server omits expires_in
_OAUTH_ERROR_CODE = re.compile(r"[a-z_]{1,64}")
_AUTH_CALL = "token request to the authorization server"


class NoAuth(AuthBase):
    """Sends requests as they are; also overrides a session-wide auth for one request."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


class BearerAuth(AuthBase):
    """Sends a static bearer token; the token never appears in repr() or messages."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"


class SmartBackendAuth(AuthBase):
    """SMART Backend Services: trade a signed JWT for an access token, cache it until it expires.

    Usage::

        auth = SmartBackendAuth(token_url="https://auth.example.org/token", client_id="fhir-dm",
                                private_key_pem=pem_text, key_id="key-1", session=session)
        session.get(url, auth=auth)

    The token request goes through `session` (the client's, so proxies and TLS settings agree)
    with auth switched off; a lock keeps concurrent requests from fetching tokens in parallel.
    """

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        private_key_pem: str,
        key_id: str,
        session: requests.Session,
        algorithm: str = "RS384",
        scope: str = "",
        token_lifetime_seconds: int = MAX_ASSERTION_LIFETIME_SECONDS,
        expiry_skew_seconds: float = DEFAULT_EXPIRY_SKEW_SECONDS,
        timeout: tuple[float, float] = DEFAULT_TOKEN_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < token_lifetime_seconds <= MAX_ASSERTION_LIFETIME_SECONDS:
            limit = MAX_ASSERTION_LIFETIME_SECONDS
            raise KnowledgeError(f"auth.token_lifetime_seconds must be between 1 and {limit}")
        self._key = _load_private_key(private_key_pem, algorithm)
        self._token_url = token_url
        self._client_id = client_id
        self._key_id = key_id
        self._algorithm = algorithm
        self._scope = scope
        self._lifetime = token_lifetime_seconds
        self._skew = expiry_skew_seconds
        self._timeout = timeout
        self._session = session
        self._clock = clock
        self._lock = threading.Lock()
        self._access_token: str | None = None
        self._expires_at = 0.0

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.access_token()}"
        return r

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self._client_id!r}, algorithm={self._algorithm!r})"

    def access_token(self) -> str:
        """The cached access token, fetching a new one when it is about to expire."""
        with self._lock:
            if self._access_token is None or self._clock() >= self._expires_at:
                self._access_token, self._expires_at = self._fetch_token()
            return self._access_token

    def invalidate(self) -> None:
        """Forget the cached token, e.g. after the FHIR server rejected it early."""
        with self._lock:
            self._access_token = None
            self._expires_at = 0.0

    def client_assertion(self) -> str:
        """A fresh JWT proving our identity to the token endpoint (RFC 7523)."""
        now = int(self._clock())
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": self._token_url,
            "iat": now,
            "exp": now + self._lifetime,
            "jti": str(uuid.uuid4()),
        }
        headers = {"kid": self._key_id, "typ": "JWT"}
        return jwt.encode(claims, self._key, algorithm=self._algorithm, headers=headers)

    def _fetch_token(self) -> tuple[str, float]:
        """POST the client_credentials grant; map every failure to the UpstreamError tree."""
        form = {
            "grant_type": "client_credentials",
            "scope": self._scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }
        # The token request happens inside a FHIR call, so it shares that request's deadline.
        timeout = deadlines.cap_timeout(self._timeout, deadlines.current(), _AUTH_CALL)
        started = time.monotonic()
        try:
            response = self._session.post(
                self._token_url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=timeout,
                auth=NoAuth(),
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            raise _token_error(UpstreamTimeoutError, f"{_AUTH_CALL} timed out", None) from exc
        except requests.RequestException as exc:
            raise _token_error(
                UpstreamError, f"{_AUTH_CALL} failed: {type(exc).__name__}", None
            ) from exc
        elapsed_ms = (time.monotonic() - started) * 1000
        _log.info("token request -> %s in %.0f ms", response.status_code, elapsed_ms)
        status = response.status_code
        if status >= 300:
            detail = _oauth_error_code(response)
            message = f"{_AUTH_CALL} failed: HTTP {status}" + (f": {detail}" if detail else "")
            cls = UpstreamRejectedError if 400 <= status < 500 else UpstreamError
            raise _token_error(cls, message, status)
        try:
            body = response.json()
        except ValueError as exc:
            raise _token_error(
                UpstreamError, f"{_AUTH_CALL} returned a body that is not JSON", status
            ) from exc
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise _token_error(UpstreamError, f"{_AUTH_CALL} returned no access_token", status)
        expires_in = body.get("expires_in", DEFAULT_EXPIRES_IN_SECONDS)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            expires_in = DEFAULT_EXPIRES_IN_SECONDS
        return token, self._clock() + max(float(expires_in) - self._skew, 0.0)


def auth_from_config(cfg: AuthConfig, session: requests.Session) -> AuthBase:
    """Build the auth the config asks for; reads `private_key_file` (this is an edge)."""
    if cfg.kind == "bearer":
        assert cfg.token is not None  # guaranteed by AuthConfig's validator
        return BearerAuth(cfg.token.get_secret_value())
    if cfg.kind == "smart-backend":
        assert cfg.token_url and cfg.client_id and cfg.key_id  # guaranteed by the validator
        if cfg.private_key_pem is not None:
            pem = cfg.private_key_pem.get_secret_value()
        else:
            assert cfg.private_key_file is not None
            try:
                pem = cfg.private_key_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise KnowledgeError(
                    f"auth.private_key_file cannot be read: {exc.strerror or type(exc).__name__}"
                ) from exc
        return SmartBackendAuth(
            token_url=cfg.token_url,
            client_id=cfg.client_id,
            private_key_pem=pem,
            key_id=cfg.key_id,
            session=session,
            algorithm=cfg.algorithm,
            scope=cfg.scope,
            token_lifetime_seconds=cfg.token_lifetime_seconds,
        )
    return NoAuth()


def _load_private_key(pem: str, algorithm: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """Parse the PEM once, at startup, and check it can sign with `algorithm`."""
    try:
        key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError) as exc:
        raise KnowledgeError("auth private key is not an unencrypted PEM private key") from exc
    if algorithm == "RS384" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if (
        algorithm == "ES384"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP384R1)
    ):
        return key
    if algorithm not in ("RS384", "ES384"):
        raise KnowledgeError("auth.algorithm must be RS384 or ES384")
    needed = "an RSA key" if algorithm == "RS384" else "an EC P-384 key"
    raise KnowledgeError(f"auth.algorithm {algorithm} needs {needed}")


def _oauth_error_code(response: requests.Response) -> str | None:
    """The OAuth `error` code (e.g. invalid_client) when the body has one; nothing else."""
    try:
        body: Any = response.json()
    except ValueError:
        return None
    code = body.get("error") if isinstance(body, dict) else None
    if isinstance(code, str) and _OAUTH_ERROR_CODE.fullmatch(code):
        return code
    return None


def _token_error(cls: type[UpstreamError], message: str, status: int | None) -> UpstreamError:
    """An UpstreamError carrying `upstream_status` like the client's errors do."""
    exc = cls(message)
    setattr(exc, "upstream_status", status)  # noqa: B010 - not declared in errors.py
    return exc
