"""The SDK's error names over llama_broker's error tree, the small request and
response records they carry, and the translation of llama_broker's errors."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Type

from .. import errors as _e
from ..errors import BrokerError, Headers

# =============================================================================
# errors: the SDK's names, llama_broker's tree
# =============================================================================


class _Request:
    """Where an error happened (the SDK gives an httpx request here)."""

    __slots__ = ("method", "url")

    def __init__(self, method: str, url: str) -> None:
        self.method = method
        self.url = url

    def __repr__(self) -> str:
        return f"<Request({self.method!r}, {self.url!r})>"


class _Response:
    """The error response's status, request, body and headers (the SDK gives an
    httpx response); ``headers`` is case-insensitive, as httpx's."""

    __slots__ = ("status_code", "request", "text", "headers")

    def __init__(
        self, status_code: int, request: Optional[_Request], text: str, headers: Optional[Headers] = None
    ) -> None:
        self.status_code = status_code
        self.request = request
        self.text = text
        self.headers: Headers = headers if headers is not None else Headers()

    def json(self) -> Any:
        return json.loads(self.text)

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}]>"


class OpenAIError(BrokerError):
    """Base of the SDK-named errors (a :class:`llama_broker.BrokerError`)."""


class APIError(OpenAIError):
    """The SDK's ``APIError``: ``message``, ``request``, ``body``, ``code``, ``param``, ``type``."""

    prefix = "api"

    request: Optional[_Request] = None
    body: Any = None
    code: Any = None  # the SDK's: a str (llama_broker's APIError keeps the server's value)
    param: Optional[str] = None
    type: Optional[str] = None

    def _sdk_fields(self, message: str, request: Optional[_Request], body: Any) -> None:
        Exception.__init__(self, message)
        self.message = message
        self.request = request
        self.body = body
        if isinstance(body, dict):
            code = body.get("code")
            self.code = str(code) if code is not None else None
            param = body.get("param")
            self.param = param if isinstance(param, str) else None
            etype = body.get("type")
            self.type = etype if isinstance(etype, str) else None
        else:
            self.code = self.param = self.type = None

    def __init__(self, message: str, request: Optional[_Request] = None, *, body: Any = None) -> None:
        self._sdk_fields(message, request, body)


class APIStatusError(APIError, _e.APIError):
    """An HTTP 4xx/5xx answer: ``status_code`` (also ``status``), ``response``,
    and ``message`` as the SDK words it (``Error code: 400 - …``)."""

    status_code: int
    response: _Response
    request_id: Optional[str] = None

    def __init__(
        self,
        message: str,
        *,
        response: _Response,
        body: Any,
        server_message: Optional[str] = None,
        raw: Optional[str] = None,
    ) -> None:
        self._sdk_fields(message, response.request, body)
        self.response = response
        self.status_code = response.status_code
        self.status = response.status_code
        self.request_id = None
        self.server_message = server_message if server_message is not None else message
        self.raw_body = raw

    def __str__(self) -> str:
        kind = f" ({self.type})" if self.type else ""
        return f"api: HTTP {self.status_code}{kind}: {self.server_message}"


class BadRequestError(APIStatusError):
    """HTTP 400 (the SDK's ``BadRequestError``)."""

    status_code = 400


class AuthenticationError(APIStatusError):
    """HTTP 401 (the SDK's ``AuthenticationError``)."""

    status_code = 401


class PermissionDeniedError(APIStatusError):
    """HTTP 403 (the SDK's ``PermissionDeniedError``)."""

    status_code = 403


class NotFoundError(APIStatusError):
    """HTTP 404 (the SDK's ``NotFoundError``)."""

    status_code = 404


class ConflictError(APIStatusError):
    """HTTP 409 (the SDK's ``ConflictError``)."""

    status_code = 409


class UnprocessableEntityError(APIStatusError):
    """HTTP 422 (the SDK's ``UnprocessableEntityError``)."""

    status_code = 422


class RateLimitError(APIStatusError):
    """HTTP 429 (the SDK's ``RateLimitError``)."""

    status_code = 429


class InternalServerError(APIStatusError):
    """HTTP 500 or above (the SDK's ``InternalServerError``)."""


_STATUS_ERRORS: Dict[int, Type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


class APIStreamError(APIError, _e.APIError):
    """An error the server reported inside the event stream (the SDK raises its
    ``APIError`` there; this is one, and a ``llama_broker.APIError`` with ``status`` None)."""

    def __init__(self, message: str, request: Optional[_Request] = None, *, body: Any = None) -> None:
        self._sdk_fields(message, request, body)
        self.status = None

    def __str__(self) -> str:
        kind = f" ({self.type})" if self.type else ""
        return f"api: in stream{kind}: {self.message}"


class APIConnectionError(APIError, _e.TransportError):
    """The connection failed or broke (a ``llama_broker.TransportError``: ``curl_code``,
    ``bytes_received``, ``delivered``)."""

    prefix = "transport"

    #: what went wrong, in llama_broker's words (``message`` is the SDK's)
    detail: Optional[str] = None

    def __init__(self, *, message: str = "Connection error.", request: Optional[_Request] = None) -> None:
        self._sdk_fields(message, request, None)
        self.curl_code: Optional[int] = None
        self.bytes_received = 0
        self.delivered = False

    def __str__(self) -> str:
        return f"{self.prefix}: {self.detail or self.message}"


class APITimeoutError(APIConnectionError, _e.TimeoutError_):
    """A connect or read timeout (a ``llama_broker.TimeoutError_``)."""

    def __init__(self, request: Optional[_Request] = None, *, message: str = "Request timed out.") -> None:
        super().__init__(message=message, request=request)


class APIResponseValidationError(APIError, _e.ProtocolError):
    """The server sent something that cannot be decoded (a ``llama_broker.ProtocolError``)."""

    prefix = "protocol"

    def __init__(self, message: str, request: Optional[_Request] = None, *, status_code: int = 200) -> None:
        self._sdk_fields(message, request, None)
        self.status_code = status_code


class JSONDecodeError(APIResponseValidationError, json.JSONDecodeError):
    """A ``data:`` line that is not JSON. The SDK raises ``json.JSONDecodeError``
    there; this is one (same name, ``msg``, ``doc``, ``pos``, same text), and an
    :class:`APIResponseValidationError` (a ``llama_broker.ProtocolError``)."""

    def __init__(self, msg: str, doc: str, pos: int, request: Optional[_Request] = None) -> None:
        json.JSONDecodeError.__init__(self, msg, doc, pos)
        self._sdk_fields(json.JSONDecodeError.__str__(self), request, None)
        self.status_code = 200

    def __str__(self) -> str:
        return json.JSONDecodeError.__str__(self)

    def __reduce__(self) -> Any:
        return (type(self), (self.msg, self.doc, self.pos, self.request))


def _error_body(raw: Optional[str]) -> Any:
    if raw is None:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.strip()
    return body.get("error", body) if isinstance(body, dict) else body


def _said(raw: str) -> Optional[str]:
    """The message an error body's JSON names (``{"error": {"message": …}}``), as
    the SDK puts it after ``Error code: N - ``; None for any other body."""
    try:
        body = json.loads(raw.strip())
    except ValueError:
        return None
    error = body.get("error", body) if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) and message else None


def _convert(err: BaseException, request: Optional[_Request]) -> BaseException:
    """The SDK-named error for one of llama_broker's (other exceptions unchanged)."""
    if isinstance(err, OpenAIError):
        if getattr(err, "request", None) is None and request is not None:  # raised by a decoder: no request
            err.request = request  # type: ignore[attr-defined]
        return err
    if not isinstance(err, BrokerError):
        return err
    out: APIError
    if isinstance(err, _e.APIError):
        body = _error_body(err.body)
        if body is None and (err.type or err.code is not None):
            body = {"message": err.message, "type": err.type, "code": err.code}
        elif body is None and err.status is not None:
            body = ""  # the SDK's body for an empty error response is its (empty) text
        if err.status is None:
            out = APIStreamError(err.message, request, body=body if body is not None else err.message)
        else:
            status = err.status
            cls = _STATUS_ERRORS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
            said = _said(err.body or "")
            msg = f"Error code: {status}" + (f" - {said}" if said else "")
            out = cls(
                msg,
                response=_Response(status, request, err.body or "", err.headers),
                body=body,
                server_message=err.message,
                raw=err.body,
            )
    elif isinstance(err, _e.TransportError):
        if isinstance(err, _e.TimeoutError_):
            out = APITimeoutError(request)
        else:
            out = APIConnectionError(request=request)
        out.detail = err.message  # type: ignore[attr-defined]
        out.curl_code = err.curl_code  # type: ignore[attr-defined]
        out.bytes_received = err.bytes_received  # type: ignore[attr-defined]
        out.delivered = err.delivered  # type: ignore[attr-defined]
    elif isinstance(err, _e.ProtocolError):
        out = APIResponseValidationError(err.message, request)
    else:  # ConfigError and other caller mistakes stay as they are
        return err
    out.__cause__ = err
    return out


# =============================================================================
# chat.completions.parse: the answer cannot be parsed
# =============================================================================


class LengthFinishReasonError(OpenAIError):
    """``chat.completions.parse``: a choice stopped at the length limit, so its
    content cannot be parsed (``completion`` is the answer)."""

    prefix = "api"

    def __init__(self, *, completion: Any) -> None:
        msg = "Could not parse response content as the length limit was reached"
        usage = getattr(completion, "usage", None)
        if usage:
            msg += f" - {usage!r}"
        super().__init__(msg)
        self.completion = completion


class ContentFilterFinishReasonError(OpenAIError):
    """``chat.completions.parse``: a choice was stopped by the content filter."""

    prefix = "api"

    def __init__(self, *, completion: Any = None) -> None:
        super().__init__("Could not parse response content as the request was rejected by the content filter")
        self.completion = completion

