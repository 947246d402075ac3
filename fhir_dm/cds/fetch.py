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


def fhir_server_allowed(url: str, allowed: tuple[str, ...], *, development: bool) -> bool:
    """Whether the EHR's token may be sent to `url` (an SSRF and token-leak guard).

    An empty allowlist accepts any server without dot segments, in development only.
    """
    if url_origin(url) is None or has_dot_segment(urlsplit(url).path):
        return False
    if not allowed:
        return development
    return any(url_under(url, entry) for entry in allowed)


def same_base(first: str, second: str) -> bool:
    """The same server base: origin and path equal (a trailing slash aside)."""
    origin = url_origin(first)
    return (
        origin is not None
        and origin == url_origin(second)
        and urlsplit(first).path.rstrip("/") == urlsplit(second).path.rstrip("/")
    )


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

    def __init__(self, base_url: str) -> None:
        super().__init__()
        self._base_url = base_url.rstrip("/")
        self.max_redirects = 0

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        """Every request without redirects: a 3xx comes back to the caller as an answer."""
        kwargs["allow_redirects"] = False
        return super().request(method, url, *args, **kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        """Refuse (before any byte is sent) a URL outside the base; send the rest unchanged."""
        if not url_under(str(request.url or ""), self._base_url):
            # The URL is not logged: it may hold patient ids in its query.
            logger.warning("CDS fetch refused: a request would leave the allowed FHIR server")
            raise OutsideAllowedServerError("request outside the allowed FHIR server")
        kwargs["allow_redirects"] = False
        return super().send(request, **kwargs)
