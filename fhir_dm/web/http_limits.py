"""HTTP framing limits, shared by the app (`fhir_dm.web.limits`) and the gunicorn config.

Kept free of imports so gunicorn's master process can read them cheaply. Sharing them means
the service answers an oversized header the same way (431) whichever of the two sees it first.
A header field counts as `Name: value` plus CRLF, as gunicorn counts it.
"""

from __future__ import annotations

MAX_HEADER_FIELD_BYTES = 8190
MAX_HEADER_FIELDS = 100
MAX_REQUEST_LINE_BYTES = 4094
