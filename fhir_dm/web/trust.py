"""Inbound trust: decides who may call the CDS Hooks service, the FHIR operations and the app.

Modes: `smart` (SMART access tokens from the EHR's authorization server, see
`access_tokens`; what they allow is checked in `authorize`), `jwt` (CDS Hooks 2.0 client JWTs:
signed by a trusted issuer, one-shot, `aud` the endpoint called), `static` (operator tokens),
`off` (development only).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
import requests
from cachetools import TLRUCache
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from fhir_dm.cds.replay import ReplayGuard
from fhir_dm.common.errors import AuthError, KnowledgeError
from fhir_dm.web.access_tokens import (
    AccessGrant,
    AccessTokenVerifier,
    SmartTrust,
    audience_matches,
    get_small_json,
    secure_url,
)

logger = logging.getLogger(__name__)

TrustMode = Literal["smart", "jwt", "static", "off"]
JkuPolicy = Literal["fetch", "ignore"]
Clock = Callable[[], float]

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
DEFAULT_ALGORITHMS = ("RS384", "ES384")
DEFAULT_JWKS_TIMEOUT_SECONDS = 5.0
DEFAULT_JWKS_REFETCH_SECONDS = 60.0
DEFAULT_JWKS_FAILURE_BACKOFF_SECONDS = 5.0
DEFAULT_MAX_JWKS_BYTES = 512 * 1024
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024
MIN_STATIC_TOKEN_LENGTH = 32

_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class IssuerTrust(BaseModel):
    """One trusted CDS client (EHR), identified by `iss`, and where its public keys live.

    Usage::

        IssuerTrust(
            iss="https://ehr.example.org",
            jwks_url="https://ehr.example.org/.well-known/jwks.json",
            allowed_jku=("https://ehr.example.org/keys/cds.json",),
        )
        IssuerTrust(iss="https://ehr.example.org", jwks_file=Path("ehr-keys.json"),
                    jku_policy="ignore")   # pinned keys: nothing is fetched

    `jwks_url` is the key set exchanged out of band; `allowed_jku` lists the exact URLs the
    issuer may name in a token's `jku` header (`jwks_url` is itself an acceptable `jku`).
    Pinned keys (`jwks`, an inline JWK Set, or `jwks_file`) are used without any network
    call. `jku_policy` says what a token's `jku` header does: `fetch` (the default) fetches
    the named key set when it is allowed and rejects the token otherwise; `ignore` never
    fetches it and verifies with the pinned keys (then `jwks_url`), for an EHR whose `jku`
    fhir-dm cannot reach.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    iss: str = Field(min_length=1)
    jwks_url: str | None = None
    allowed_jku: tuple[str, ...] = ()
    jwks: dict[str, Any] | None = None
    jwks_file: Path | None = None
    jku_policy: JkuPolicy = "fetch"

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url_is_secure(cls, value: str | None) -> str | None:
        return None if value is None else secure_url(value, "JWKS URL")

    @field_validator("allowed_jku")
    @classmethod
    def _jku_are_secure(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(secure_url(url, "JWKS URL") for url in value)

    @field_validator("jwks")
    @classmethod
    def _jwks_has_public_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                _parse_key_set(value)
            except AuthError as exc:
                raise ValueError(exc.message.replace("jwt rejected: ", "pinned ")) from None
        return value

    @model_validator(mode="after")
    def _has_key_source(self) -> IssuerTrust:
        if self.jwks is not None and self.jwks_file is not None:
            raise ValueError(f"issuer {self.iss!r}: pin keys with jwks or jwks_file, not both")
        pinned = self.jwks is not None or self.jwks_file is not None
        if self.jwks_url is None and not self.allowed_jku and not pinned:
            raise ValueError(f"issuer {self.iss!r} needs jwks_url, allowed_jku, jwks or jwks_file")
        if self.jku_policy == "ignore" and self.jwks_url is None and not pinned:
            raise ValueError(
                f"issuer {self.iss!r}: jku_policy 'ignore' needs pinned keys (jwks or"
                " jwks_file) or jwks_url to verify with"
            )
        return self

    def accepts_jku(self, jku: str) -> bool:
        """Exact match only: a prefix or pattern would let a token point at any key set."""
        return jku in self.allowed_jku or jku == self.jwks_url

    def pinned_keys(self) -> dict[str, dict[str, Any]] | None:
        """The pinned public keys by kid (reads `jwks_file`); KnowledgeError if unusable."""
        document: Any = self.jwks
        if self.jwks_file is not None:
            try:
                document = json.loads(self.jwks_file.read_text(encoding="utf-8"))
            except OSError as exc:
                raise KnowledgeError(
                    f"trust: issuer {self.iss}: jwks_file cannot be read:"
                    f" {exc.strerror or type(exc).__name__}"
                ) from None
            except ValueError:
                raise KnowledgeError(f"trust: issuer {self.iss}: jwks_file is not JSON") from None
        if document is None:
            return None
        try:
            return _parse_key_set(document)
        except AuthError as exc:
            raise KnowledgeError(
                f"trust: issuer {self.iss}: {exc.message.replace('jwt rejected: ', 'pinned ')}"
            ) from None


class TrustConfig(BaseModel):
    """Who may call us. `mode="off"` must be chosen explicitly; the default is JWT.

    Usage::

        TrustConfig(
            mode="jwt",
            issuers=(IssuerTrust(iss="https://ehr.example.org", jwks_url="https://..."),),
            algorithms=("ES384", "RS384"),
        )
        TrustConfig(mode="smart")  # SMART access tokens of the FHIR server's authorization server
        TrustConfig(mode="static", static_tokens=("<at least 32 random characters>",))
        TrustConfig(mode="off")  # development only: every caller is anonymous

    `smart` is for the clinician's app and REST clients of an EHR (access tokens, with scopes
    and a patient context); `jwt` is CDS Hooks client trust (one-shot JWTs), the only mode
    besides `off` for `cds.trust`.

    Only asymmetric algorithms are allowed: a shared-secret (HS*) algorithm would let anyone
    holding the issuer's public key forge tokens, and `none` has no signature at all.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: TrustMode = "jwt"
    issuers: tuple[IssuerTrust, ...] = ()
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    static_tokens: tuple[SecretStr, ...] = ()
    jwks_cache_seconds: int = Field(default=3600, gt=0)
    max_token_age_seconds: int = Field(default=300, gt=0)
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    replay_cache_size: int = Field(default=10000, gt=0)
    smart: SmartTrust | None = Field(
        default=None,
        description="Mode `smart`: the authorization server and its tokens (default: all "
        "discovered from the FHIR server's smart-configuration).",
    )

    @field_validator("algorithms")
    @classmethod
    def _only_asymmetric(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("algorithms must list at least one algorithm")
        allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))
        for alg in value:
            if alg.lower() == "none":
                raise ValueError(
                    f"algorithm 'none' is never allowed (unsigned tokens); use {allowed}"
                )
            if alg.upper().startswith("HS"):
                raise ValueError(
                    f"algorithm {alg!r} is not allowed: symmetric (HMAC) algorithms cannot "
                    f"authenticate a CDS client; use {allowed}"
                )
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"algorithm {alg!r} is not allowed; use {allowed}")
        return tuple(dict.fromkeys(value))

    @field_validator("static_tokens")
    @classmethod
    def _static_tokens_are_long(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for index, token in enumerate(value):
            secret = token.get_secret_value()
            if len(secret) < MIN_STATIC_TOKEN_LENGTH or secret != secret.strip():
                raise ValueError(
                    f"static_tokens[{index}] must be at least {MIN_STATIC_TOKEN_LENGTH} "
                    "characters without surrounding whitespace"
                )
        return value

    @model_validator(mode="after")
    def _mode_is_usable(self) -> TrustConfig:
        if self.mode == "jwt" and not self.issuers:
            raise ValueError(
                "mode 'jwt' needs at least one trusted issuer (the clinician's app and an EHR's"
                " REST clients use mode 'smart': SMART access tokens)"
            )
        if self.smart is not None and self.mode != "smart":
            raise ValueError("trust.smart is read in mode 'smart' only")
        if self.mode == "static" and not self.static_tokens:
            raise ValueError("mode 'static' needs at least one static token")
        names = [issuer.iss for issuer in self.issuers]
        if len(names) != len(set(names)):
            raise ValueError("issuers must have distinct iss values")
        return self


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller, for audit and authorisation; never holds the token.

    `grant` is what a SMART access token allows (mode `smart`); None means the caller is not
    limited by scopes (an operator's static token, a CDS client JWT, or trust off).
    """

    issuer: str | None
    subject: str | None
    mode: TrustMode
    grant: AccessGrant | None = None


@dataclass(slots=True)
class _KeySet:
    keys: dict[str, dict[str, Any]]
    fetched_at: float


class JwksCache:
    """Caches each issuer's JWK Set so a request costs no network call in the common case.

    Usage::

        cache = JwksCache(session=requests.Session(), cache_seconds=3600)
        key = cache.get_key("https://ehr.example.org/jwks.json", "kid-1", algorithm="ES384")

    An unknown `kid` triggers at most one re-fetch per URL per `refetch_seconds`, so key
    rotation works without letting random `kid` values hammer the issuer.
    """

    def __init__(
        self,
        *,
        session: requests.Session,
        cache_seconds: float,
        clock: Clock = time.time,
        timeout: float = DEFAULT_JWKS_TIMEOUT_SECONDS,
        refetch_seconds: float = DEFAULT_JWKS_REFETCH_SECONDS,
        failure_backoff_seconds: float = DEFAULT_JWKS_FAILURE_BACKOFF_SECONDS,
        max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
    ) -> None:
        self._session = session
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._timeout = timeout
        self._refetch_seconds = refetch_seconds
        self._failure_backoff_seconds = failure_backoff_seconds
        self._max_bytes = max_bytes
        self._sets: dict[str, _KeySet] = {}
        self._last_attempt: dict[str, float] = {}
        self._last_failure: dict[str, float] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def get_key(self, url: str, kid: str, *, algorithm: str) -> jwt.PyJWK:
        """Return the key `kid` from `url`, bound to `algorithm`; raise AuthError otherwise."""
        with self._lock_for(url):
            now = self._clock()
            key_set = self._sets.get(url)
            if key_set is None or now - key_set.fetched_at >= self._cache_seconds:
                key_set = self._fetch(url, now)
            elif kid not in key_set.keys:
                last = self._last_attempt.get(url)
                if last is None or now - last >= self._refetch_seconds:
                    logger.info("jwks: kid unknown, re-fetching key set")
                    key_set = self._fetch(url, now)
            jwk_data = key_set.keys.get(kid)
        if jwk_data is None:
            raise AuthError("jwt rejected: kid unknown")
        return _bind_key(jwk_data, algorithm)

    def _lock_for(self, url: str) -> threading.Lock:
        """One lock per URL: a slow issuer must not stall callers of other issuers."""
        with self._locks_guard:
            return self._locks.setdefault(url, threading.Lock())

    def _fetch(self, url: str, now: float) -> _KeySet:
        failed_at = self._last_failure.get(url)
        if failed_at is not None and now - failed_at < self._failure_backoff_seconds:
            raise AuthError("jwt rejected: key set unavailable")
        self._last_attempt[url] = now
        try:
            keys = self._download(url)
        except AuthError as exc:
            self._last_failure[url] = now
            logger.warning("jwks fetch failed: %s", exc.message)
            raise
        self._last_failure.pop(url, None)
        key_set = _KeySet(keys=keys, fetched_at=now)
        self._sets[url] = key_set
        return key_set

    def _download(self, url: str) -> dict[str, dict[str, Any]]:
        try:
            document = get_small_json(
                self._session, url, timeout=self._timeout, max_bytes=self._max_bytes
            )
        except AuthError as exc:
            raise AuthError(f"jwt rejected: key set {exc.message}") from exc
        return _parse_key_set(document)


def _parse_key_set(document: Any) -> dict[str, dict[str, Any]]:
    """Keep public RSA/EC signing keys with a kid; private or symmetric members are dropped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise AuthError("jwt rejected: key set has no keys")
    candidates = [
        key
        for key in document["keys"]
        if isinstance(key, dict)
        and isinstance(key.get("kid"), str)
        and key.get("kty") in {"RSA", "EC"}
        and not _PRIVATE_JWK_MEMBERS & key.keys()
    ]
    try:
        usable = {key.key_id for key in jwt.PyJWKSet(candidates)}
    except jwt.PyJWTError as exc:
        raise AuthError("jwt rejected: key set has no usable keys") from exc
    keys: dict[str, dict[str, Any]] = {}
    for key in candidates:
        if key["kid"] in usable:
            keys.setdefault(key["kid"], key)
    return keys


def _bind_key(jwk_data: Mapping[str, Any], algorithm: str) -> jwt.PyJWK:
    """Bind a JWK to the token's algorithm, refusing keys published for another use."""
    if jwk_data.get("alg") not in (None, algorithm):
        raise AuthError("jwt rejected: key algorithm mismatch")
    if jwk_data.get("use") not in (None, "sig"):
        raise AuthError("jwt rejected: key not for signatures")
    key_ops = jwk_data.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise AuthError("jwt rejected: key not for verification")
    expected_kty = "EC" if algorithm.startswith("ES") else "RSA"
    if jwk_data.get("kty") != expected_kty:
        raise AuthError("jwt rejected: key type mismatch")
    if expected_kty == "EC" and jwk_data.get("crv") != _EC_CURVES.get(algorithm):
        raise AuthError("jwt rejected: key curve mismatch")
    try:
        return jwt.PyJWK(dict(jwk_data), algorithm=algorithm)
    except jwt.PyJWTError as exc:
        raise AuthError("jwt rejected: key unusable") from exc


class ReplayCache:
    """Remembers each `jti` per issuer until its token expires, so a token works only once.

    A cachetools TLRU cache: each entry lives until its own token's `exp` (plus leeway), and
    when full, expired entries go first, then the least recently seen live ones (logged,
    since that reopens a replay window for those tokens). Per process: workers and hosts share
    `fhir_dm.cds.state`'s stores instead.
    """

    def __init__(
        self, max_size: int, *, leeway_seconds: float = 0, clock: Clock = time.time
    ) -> None:
        self._leeway = leeway_seconds
        self._clock = clock
        self._seen: _LoggingTlru = _LoggingTlru(
            maxsize=max_size, ttu=lambda _key, until, _now: until, timer=clock
        )
        self._lock = threading.Lock()

    def check_and_remember(self, iss: str, jti: str, exp: float) -> None:
        """Raise AuthError if (iss, jti) was seen and has not expired; else remember it."""
        key = (iss, jti)
        with self._lock:
            if key in self._seen:
                raise AuthError("jwt rejected: jti replayed")
            self._seen[key] = exp + self._leeway

    def __len__(self) -> int:
        with self._lock:
            self._seen.expire()
            return len(self._seen)


class _LoggingTlru(TLRUCache[tuple[str, str], float]):
    """A TLRU cache that logs when it must drop a live entry to make room."""

    def popitem(self) -> tuple[tuple[str, str], float]:
        item = super().popitem()
        logger.warning("replay cache full: evicted an unexpired jti")
        return item


class JwtVerifier:
    """Verifies a CDS client's bearer JWT as CDS Hooks 2.0 "Trusting CDS Clients" requires.

    Usage::

        verifier = JwtVerifier(config, session=requests.Session())
        claims = verifier.verify(token, audience="https://dm.example.org/cds-services/dm-risk")

    Every failure raises AuthError with a short reason; the token never appears in it.
    """

    def __init__(
        self,
        config: TrustConfig,
        *,
        session: requests.Session,
        clock: Clock = time.time,
        replay: ReplayGuard | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._issuers = {issuer.iss: issuer for issuer in config.issuers}
        self._pinned = {issuer.iss: issuer.pinned_keys() for issuer in config.issuers}
        self._jwks = JwksCache(
            session=session, cache_seconds=config.jwks_cache_seconds, clock=clock
        )
        self._replay: ReplayGuard = replay or ReplayCache(
            config.replay_cache_size, leeway_seconds=config.leeway_seconds, clock=clock
        )

    def verify(self, token: str, *, audience: str) -> dict[str, Any]:
        """Return the verified claims of `token` for the endpoint URL `audience`."""
        issuer: IssuerTrust | None = None
        try:
            if not token or len(token) > DEFAULT_MAX_TOKEN_BYTES:
                raise AuthError("jwt rejected: token empty or too large")
            header = self._read_header(token)
            issuer = self._pick_issuer(token)
            return self._verify_signed(token, header, issuer, audience)
        except AuthError as exc:
            # Only an allowlisted iss is logged: anything else is attacker-controlled text.
            logger.warning("%s (iss=%s)", exc.message, issuer.iss if issuer else "unknown")
            raise

    def _verify_signed(
        self, token: str, header: Mapping[str, Any], issuer: IssuerTrust, audience: str
    ) -> dict[str, Any]:
        alg: str = header["alg"]
        key = self._key(issuer, header, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=issuer.iss,
                options={
                    "require": ["exp", "iat", "iss", "aud", "jti"],
                    # Times and audience are checked below against the injected clock and
                    # with the trailing-slash rule; PyJWT would use the wall clock.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"jwt rejected: claim {exc.claim} missing") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("jwt rejected: signature invalid") from exc
        except jwt.PyJWTError as exc:
            raise AuthError("jwt rejected: token invalid") from exc
        remember_until = self._check_claims(claims, audience)
        self._replay.check_and_remember(issuer.iss, claims["jti"], remember_until)
        return claims

    def _read_header(self, token: str) -> dict[str, Any]:
        """Check the header before any key lookup, so `none` and HS* never reach a key."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("jwt rejected: malformed") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            raise AuthError("jwt rejected: alg not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("jwt rejected: kid missing")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise AuthError("jwt rejected: typ not JWT")
        if "crit" in header:
            raise AuthError("jwt rejected: critical header not understood")
        jku = header.get("jku")
        if jku is not None and not isinstance(jku, str):
            raise AuthError("jwt rejected: jku malformed")
        return header

    def _pick_issuer(self, token: str) -> IssuerTrust:
        """Unverified claims only choose the issuer's keys; they are verified afterwards."""
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError("jwt rejected: malformed") from exc
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("jwt rejected: iss not trusted")
        return issuer

    def _key(self, issuer: IssuerTrust, header: Mapping[str, Any], alg: str) -> jwt.PyJWK:
        """The verification key: an allowed `jku` (policy fetch), else pinned, else jwks_url."""
        kid: str = header["kid"]
        jku = header.get("jku")
        if jku is not None and issuer.jku_policy == "fetch":
            if not issuer.accepts_jku(jku):
                raise AuthError("jwt rejected: jku not allowed")
            return self._jwks.get_key(str(jku), kid, algorithm=alg)
        pinned = self._pinned.get(issuer.iss)
        if pinned is not None and kid in pinned:
            return _bind_key(pinned[kid], alg)
        if issuer.jwks_url is not None:
            return self._jwks.get_key(issuer.jwks_url, kid, algorithm=alg)
        if pinned is not None:
            raise AuthError("jwt rejected: kid unknown")
        raise AuthError("jwt rejected: no key set for issuer")

    def _check_claims(self, claims: Mapping[str, Any], audience: str) -> float:
        """Check times, audience and jti; return how long the jti must be remembered."""
        now = self._clock()
        leeway = self._config.leeway_seconds
        exp = _numeric(claims, "exp")
        iat = _numeric(claims, "iat")
        if now > exp + leeway:
            raise AuthError("jwt rejected: expired")
        if iat > now + leeway:
            raise AuthError("jwt rejected: iat in the future")
        if now - iat > self._config.max_token_age_seconds + leeway:
            raise AuthError("jwt rejected: iat too old")
        if exp < iat:
            raise AuthError("jwt rejected: exp before iat")
        if "nbf" in claims and _numeric(claims, "nbf") > now + leeway:
            raise AuthError("jwt rejected: not yet valid")
        if not audience_matches(claims["aud"], (audience,)):  # the endpoint URL called
            raise AuthError("jwt rejected: aud does not match endpoint")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise AuthError("jwt rejected: jti malformed")
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise AuthError("jwt rejected: sub malformed")
        # After iat + max age the token fails the age check anyway, so no need to remember it
        # longer, even if its exp lies far in the future.
        return min(exp, iat + self._config.max_token_age_seconds)


def _numeric(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(f"jwt rejected: {name} not a number")
    return float(value)


class InboundAuth:
    """Authenticates every inbound request (CDS Hooks and FHIR operations) by `config.mode`.

    Usage::

        auth = InboundAuth(config, session=requests.Session(), fhir_base_url=fhir_base)
        principal = auth.authenticate(request.headers.get("Authorization"), audience=url)

    `audience` is the URL called, checked for CDS Hooks client JWTs only; SMART access tokens
    carry the FHIR server (or the service) as their audience.
    """

    def __init__(
        self,
        config: TrustConfig,
        *,
        session: requests.Session,
        clock: Clock = time.time,
        replay: ReplayGuard | None = None,
        fhir_base_url: str | None = None,
    ) -> None:
        self._config = config
        self._access_tokens: AccessTokenVerifier | None = None
        if config.mode == "smart":
            if fhir_base_url is None:
                raise ValueError("mode 'smart' needs the FHIR server's base URL")
            self._access_tokens = AccessTokenVerifier(
                config.smart or SmartTrust(),
                fhir_base_url=fhir_base_url,
                session=session,
                clock=clock,
            )
        self._verifier = (
            JwtVerifier(config, session=session, clock=clock, replay=replay)
            if config.mode == "jwt"
            else None
        )
        self._static_digests = tuple(
            _digest(token.get_secret_value()) for token in config.static_tokens
        )
        if config.mode == "off":
            logger.warning("inbound authentication is off: every caller is anonymous")

    @property
    def mode(self) -> TrustMode:
        """The configured mode, e.g. for /metadata or a startup banner."""
        return self._config.mode

    def authenticate(self, authorization_header: str | None, *, audience: str) -> Principal:
        """Return the caller's Principal or raise AuthError (the web layer answers 401)."""
        if self._config.mode == "off":
            return Principal(issuer=None, subject=None, mode="off")
        token = _bearer_token(authorization_header)
        if self._access_tokens is not None:
            grant = self._access_tokens.verify(token)
            return Principal(issuer=grant.issuer, subject=grant.subject, mode="smart", grant=grant)
        if self._verifier is not None:
            claims = self._verifier.verify(token, audience=audience)
            sub = claims.get("sub")
            subject = sub if isinstance(sub, str) else None
            return Principal(issuer=claims["iss"], subject=subject, mode="jwt")
        return self._authenticate_static(token)

    def _authenticate_static(self, token: str) -> Principal:
        """Compare digests in constant time, visiting every token so timing reveals nothing."""
        presented = _digest(token)
        matched: int | None = None
        for index, expected in enumerate(self._static_digests):
            if hmac.compare_digest(presented, expected) and matched is None:
                matched = index
        if matched is None:
            logger.warning("static token rejected: no match")
            raise AuthError("static token rejected")
        return Principal(issuer=None, subject=f"static-token-{matched + 1}", mode="static")


def _digest(token: str) -> bytes:
    """Hash first so compare_digest sees equal lengths and leaks no token length."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def _bearer_token(authorization_header: str | None) -> str:
    if not authorization_header:
        raise AuthError("authorization header missing")
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError("authorization header is not a bearer token")
    return token
