"""Where the EHR's access token may go: the allowlist check and a session that enforces it.

The EHR lends fhir-dm a bearer token for its own FHIR server; any request that leaves that
server's base path would hand the token (or the EHR's data) to someone else. So:

- a URL with a dot segment (`.`/`..`, also percent-encoded as `%2e`, once or twice) is refused
  outright: parsers disagree on when they resolve them (urllib3 resolves them while sending),
  so a check on the raw text would not be a check on the URL actually requested;
- `fhirServer` must be under an allowed base (origin exact, path a segment prefix);
- every request actually sent, including each `next` link of a paged search, must be under the
  request's `fhirServer` path (`AllowedServerSession.send`), and redirects are never followed:
  a 3xx answer is an error like any other non-2xx answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import requests

from fhir_dm.fhir.client import url_origin

logger = logging.getLogger(__name__)

_DOT_SEGMENTS = frozenset({".", ".."})
_UNQUOTE_ROUNDS = 3  # `%252e` is `%2e` after one round, `.` after two


def _dot_segment_in(path: str) -> bool:
    # `..;x` counts too: some servers (Tomcat) drop path parameters before resolving.
    return any(segment.split(";", 1)[0] in _DOT_SEGMENTS for segment in path.split("/"))


def has_dot_segment(path: str) -> bool:
    """Whether any path segment is `.` or `..`, as written or percent-encoded (nested too)."""
    text = path
    for _ in range(_UNQUOTE_ROUNDS):
        if _dot_segment_in(text):
            return True
        decoded = unquote(text)
        if decoded == text:
            return False
        text = decoded
    return _dot_segment_in(text)


def _path_under(path: str, base_path: str) -> bool:
    """`path` is `base_path` or below it, segment-wise (`/fhirx` is not under `/fhir`)."""
    base = base_path.rstrip("/")
    target = path.rstrip("/")
    return target == base or target.startswith(base + "/")


def url_under(url: str, base: str) -> bool:
    """Whether `url` is on `base`'s origin and under its path, with no dot segment anywhere."""
    origin = url_origin(url)
    if origin is None or origin != url_origin(base):
        return False
    path = urlsplit(url).path
    if has_dot_segment(path) or has_dot_segment(urlsplit(base).path):
        return False
    return _path_under(path, urlsplit(base).path)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_base(url: str) -> str | None:
    """A base URL in one spelling: scheme and host in lower case, no default port, no trailing
    slash (the path keeps its case: FHIR paths are case-sensitive); None for a URL not to be
    trusted (see `url_origin`)."""
    origin = url_origin(url)
    if origin is None:
        return None
    scheme, host, port = origin
    shown = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        shown += f":{port}"
    return f"{scheme}://{shown}{urlsplit(url).path.rstrip('/')}"


class ServerNames:
    """Which base URLs name the same FHIR server: normalisation, then a configured alias list.

    An EHR and a site may spell one server differently (`localhost` and `127.0.0.1`, a proxy
    name and an internal name); only the site knows which names are the same server, so
    `localhost` is never equated with `127.0.0.1` unless an alias group says so.

    Usage::

        names = ServerNames([("http://localhost:8080/fhir", "http://127.0.0.1:8080/fhir")])
        names.same("http://LOCALHOST:8080/fhir/", "http://127.0.0.1:8080/fhir")   # True
    """

    def __init__(self, groups: Iterable[Sequence[str]] = ()) -> None:
        self._canonical: dict[str, str] = {}
        self._groups: dict[str, tuple[str, ...]] = {}
        for group in groups:
            bases = tuple(b for b in (normalise_base(u) for u in group) if b is not None)
            if not bases:
                continue
            first = self._canonical.get(bases[0], bases[0])
            for base in bases:
                self._canonical.setdefault(base, first)
            members = tuple(dict.fromkeys((*self._groups.get(first, ()), *bases)))
            self._groups[first] = members

    def canonical(self, url: str) -> str | None:
        """The group's first name for `url`'s server, with `url`'s path below that base."""
        base = normalise_base(url)
        if base is None:
            return None
        best = ""
        for alias in self._canonical:
            if _path_under(base, alias) and base.startswith(alias) and len(alias) > len(best):
                best = alias
        if not best:
            return base
        return self._canonical[best] + base[len(best) :]

    def aliases(self, url: str) -> tuple[str, ...]:
        """Every name of `url`'s base (itself first), for sessions that follow `next` links."""
        base = normalise_base(url)
        if base is None:
            return ()
        canonical = self.canonical(url) or base
        out = [base]
        for first, members in self._groups.items():
            for member in members:
                if canonical == first or canonical.startswith(first + "/"):
                    out.append(member + canonical[len(first) :])
        return tuple(dict.fromkeys(out))

    def same(self, first: str, second: str) -> bool:
        """The same server base, after normalisation and aliases."""
        a, b = self.canonical(first), self.canonical(second)
        return a is not None and a == b

    def under(self, url: str, base: str) -> bool:
        """`url` under `base` (origin exact, path a segment prefix), after aliases."""
        a, b = self.canonical(url), self.canonical(base)
        return a is not None and b is not None and url_under(a, b)


NO_ALIASES = ServerNames()


def fhir_server_allowed(
    url: str, allowed: tuple[str, ...], *, development: bool, names: ServerNames = NO_ALIASES
) -> bool:
    """Whether the EHR's token may be sent to `url` (an SSRF and token-leak guard).

    An empty allowlist accepts any server without dot segments, in development only.
    """
    if url_origin(url) is None or has_dot_segment(urlsplit(url).path):
        return False
    if not allowed:
        return development
    return any(names.under(url, entry) for entry in allowed)


def same_base(first: str, second: str, names: ServerNames = NO_ALIASES) -> bool:
    """The same server base: normalised (case, default port, trailing slash) and aliased."""
    return names.same(first, second)


class OutsideAllowedServerError(requests.RequestException):
    """A request would have left the allowed FHIR server; it was not sent."""


class AllowedServerSession(requests.Session):
    """A session that only sends requests under one base URL and never follows a redirect.

    Usage::

        session = AllowedServerSession("https://ehr.example.org/fhir/r4")
        FhirClient("https://ehr.example.org/fhir/r4", session=session, auth=BearerAuth(token))

    The check runs in `send`, on the prepared URL that goes on the wire, so it also covers
    `next` links and anything a caller builds; `FhirClient` maps the refusal to UpstreamError.
    """

    def __init__(self, base_url: str, aliases: Sequence[str] = ()) -> None:
        """`aliases`: other names of the same base (a server's `next` links may use one)."""
        super().__init__()
        self._bases = tuple(dict.fromkeys((base_url.rstrip("/"), *aliases)))
        self.max_redirects = 0

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        """Every request without redirects: a 3xx comes back to the caller as an answer."""
        kwargs["allow_redirects"] = False
        return super().request(method, url, *args, **kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        """Refuse (before any byte is sent) a URL outside the base; send the rest unchanged."""
        url = str(request.url or "")
        if not any(url_under(url, base) for base in self._bases):
            # The URL is not logged: it may hold patient ids in its query.
            logger.warning("CDS fetch refused: a request would leave the allowed FHIR server")
            raise OutsideAllowedServerError("request outside the allowed FHIR server")
        kwargs["allow_redirects"] = False
        return super().send(request, **kwargs)
