"""The one exception tree of fhir-dm; edges map it to OperationOutcome or an exit code.

```
FhirDmError                       status  issue_code
├── InputError                    400     invalid        the caller's data is wrong
│   ├── NotJsonError              400     structure
│   ├── NotFhirError              400     structure      expression from the validation path
│   ├── NoPatientError            400     required
│   ├── PayloadTooLargeError      413     too-long
│   ├── TooCostlyError            413     too-costly     over a per-request work limit
│   ├── UnsupportedMediaTypeError 415     not-supported
│   └── HeaderTooLargeError       431     too-long       a header field, or too many of them
├── PatientNotFoundError          404     not-found
├── ConflictError                 409     conflict       write-back: wrong patient, lost race
├── AuthError                     401     login
│   └── ForbiddenError            403     forbidden
├── UpstreamError                 502     exception      names the FHIR call that failed
│   ├── UpstreamTimeoutError      504     timeout
│   │   └── DeadlineExceededError 504     timeout        the request's time budget ran out
│   ├── UpstreamUnavailableError  503     transient      503 from the server (Retry-After)
│   │   ├── UpstreamThrottledError 503    throttled      429 from the server (Retry-After)
│   │   └── QueueUnavailableError  503    transient      the job queue's storage is down
│   └── UpstreamRejectedError     502     processing     quotes the server's OperationOutcome
├── PatientBusyError              503     lock-error     the patient's lock stayed held
├── PreconditionFailedError       412     incomplete     CDS Hooks: prefetch missing, unfetchable
└── KnowledgeError                500     exception      bad config/: fail at startup, CLI exit 78
    └── FhirBaseUnreachableError  500     exception      start-up check: no answer (maybe away)
```

Missing or unrecognised clinical data is never an error: it flows into the output as
unknown facts. Messages must never contain patient data (they reach logs). An error with a
`retry_after` (seconds) tells the caller when to try again (`Retry-After` header).
"""

from __future__ import annotations

from collections.abc import Sequence


class FhirDmError(Exception):
    """Base of every error fhir-dm raises on purpose."""

    status: int = 500
    issue_code: str = "exception"

    def __init__(
        self, message: str, *, expression: Sequence[str] = (), retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.expression = tuple(expression)
        self.retry_after = retry_after


class InputError(FhirDmError):
    """Raised when the caller's data cannot be used at all."""

    status = 400
    issue_code = "invalid"


class NotJsonError(InputError):
    """Raised when the input is not JSON."""

    issue_code = "structure"


class NotFhirError(InputError):
    """Raised when JSON is not a valid FHIR R4 resource; `expression` holds the path."""

    issue_code = "structure"


class NoPatientError(InputError):
    """Raised when a bundle holds no Patient to assess."""

    issue_code = "required"


class PayloadTooLargeError(InputError):
    """Raised when a request body exceeds the configured limit."""

    status = 413
    issue_code = "too-long"


class TooCostlyError(InputError):
    """Raised when a request asks for more work than one request may do (patients, output)."""

    status = 413
    issue_code = "too-costly"


class HeaderTooLargeError(InputError):
    """Raised when a request header field is too large, or there are too many of them."""

    status = 431
    issue_code = "too-long"


class UnsupportedMediaTypeError(InputError):
    """Raised when a request body is not FHIR JSON."""

    status = 415
    issue_code = "not-supported"


class PatientNotFoundError(FhirDmError):
    """Raised when the FHIR server has no Patient with the requested id."""

    status = 404
    issue_code = "not-found"


class ConflictError(FhirDmError):
    """Raised when a write would act on another patient, or keeps losing a concurrent race."""

    status = 409
    issue_code = "conflict"


class AuthError(FhirDmError):
    """Raised when a caller or an upstream token request fails authentication."""

    status = 401
    issue_code = "login"


class ForbiddenError(AuthError):
    """Raised when an authenticated caller may not do what it asked."""

    status = 403
    issue_code = "forbidden"


class UpstreamError(FhirDmError):
    """Raised when a call to the FHIR server fails; the message names the call."""

    status = 502
    issue_code = "exception"


class UpstreamTimeoutError(UpstreamError):
    """Raised when the FHIR server does not answer in time."""

    status = 504
    issue_code = "timeout"


class DeadlineExceededError(UpstreamTimeoutError):
    """Raised when the request's time budget runs out before or during a FHIR call."""


class UpstreamUnavailableError(UpstreamError):
    """Raised when the FHIR server is overloaded or throttling (429/503) beyond what we wait."""

    status = 503
    issue_code = "transient"


class UpstreamThrottledError(UpstreamUnavailableError):
    """Raised when the FHIR server throttles us (429) for longer than we may wait."""

    issue_code = "throttled"


class QueueUnavailableError(UpstreamUnavailableError):
    """Raised when the job queue's storage (Redis, the SQLite file) cannot be reached."""


class UpstreamRejectedError(UpstreamError):
    """Raised when the FHIR server refuses a request; quotes its OperationOutcome text."""

    status = 502
    issue_code = "processing"


class PatientBusyError(FhirDmError):
    """Raised when another assessment of the same patient holds its lock past our deadline."""

    status = 503
    issue_code = "lock-error"


class PreconditionFailedError(FhirDmError):
    """Raised when CDS Hooks prefetch data is missing and cannot be fetched."""

    status = 412
    issue_code = "incomplete"


class KnowledgeError(FhirDmError):
    """Raised when config/ is missing or invalid; the service must not start."""

    status = 500
    issue_code = "exception"


class FhirBaseUnreachableError(KnowledgeError):
    """The start-up check got no answer from the FHIR base: perhaps wrong, perhaps just down.

    `serve` and `worker` start anyway with a warning (readiness and retries cover a server that
    is away); the demo, which needs the server at once, stops.
    """
