"""pycurl transport: one request's easy-handle setup, callbacks and errors.

A :class:`Call` is one HTTP attempt. Its ``write`` callback is the only
Python code curl runs per network chunk: it feeds the chunk to the C
splitter and the batch of events to the decoder. An exception raised there
(the caller's ``on_delta`` included) is stored, the callback returns 0 so
curl aborts with a write error, and :meth:`Call.finish` re-raises it.

``pycurl.error`` codes are translated here, in one place, into the
:mod:`llama_broker.errors` tree.
"""

from __future__ import annotations

import json
import time
from typing import Any, List, Optional, Tuple
from urllib.parse import urldefrag, urljoin, urlsplit, urlunsplit

import pycurl

from .config import MIN_JSON_BODY_BYTES, SECRET_HEADERS, ModelConfig, check_header, mask_url
from .decoder import Decoder, api_error_from_body
from .errors import APIError, BrokerError, ConfigError, ConnectError, Headers, ProtocolError, TimeoutError_, TLSVerifyError, TransportError
from .sse import EventSplitter

__all__ = ["Call", "RESET_CODES", "translate_curl_error"]

# curl's receive buffer: bigger means fewer write callbacks on a bulk stream.
_BUFFER_SIZE = 256 * 1024

_CONNECT_CODES = {
    pycurl.E_COULDNT_CONNECT,
    pycurl.E_COULDNT_RESOLVE_HOST,
    pycurl.E_COULDNT_RESOLVE_PROXY,
    pycurl.E_SSL_CONNECT_ERROR,
}
# TLS refused on our side: the peer's certificate failed verification (60; also
# the old 51 and the issuer/pinning/status checks) or the CA bundle is unusable
# (77). Sending again cannot change the answer: never retried.
_TLS_VERIFY_CODES = {51, 60, 77, 83, 90, 91}
# The peer closed or reset the connection; before any byte arrived such a
# request never reached the model and is safe to retry.
RESET_CODES = _RESET_CODES = {
    pycurl.E_GOT_NOTHING,
    pycurl.E_RECV_ERROR,
    pycurl.E_SEND_ERROR,
    pycurl.E_PARTIAL_FILE,
}
_HTTP2_STREAM_ERROR = 92


_SECRET_HEADERS = SECRET_HEADERS  # (one list: config.SECRET_HEADERS)

#: Redirects followed per request when ``ModelConfig.follow_redirects`` is on.
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}


def _redact(err: BrokerError, secrets: List[str]) -> None:
    """Replace every secret in the error's message (and an APIError's body)."""
    if not secrets:
        return
    msg = err.message
    for sec in secrets:
        msg = msg.replace(sec, "***")
    if msg != err.message:
        err.message = msg
        err.args = (msg,)
    if isinstance(err, APIError) and err.body:
        body = err.body
        for sec in secrets:
            body = body.replace(sec, "***")
        err.body = body


def translate_curl_error(
    code: int, text: str, *, url: str, nbytes: int, delivered: bool, phase: str
) -> TransportError:
    """The :class:`TransportError` for a libcurl error code (never carries the key)."""
    where = f"{phase} {url}: curl error {code}: {text} ({nbytes} bytes received)"
    if code in _TLS_VERIFY_CODES:
        if code == 77:
            msg = (
                f"the CA bundle could not be used ({where}); ModelConfig(ca_bundle=...) must be "
                "a readable PEM file of CA certificates"
            )
        else:
            msg = (
                f"the server's TLS certificate failed verification ({where}); if the server uses a "
                "private or self-signed CA, trust it with ModelConfig(ca_bundle='/path/to/ca.pem') "
                "(a PEM file of the CA's certificate)"
            )
        return TLSVerifyError(msg, curl_code=code, bytes_received=nbytes)
    if code in _CONNECT_CODES:
        return ConnectError(f"could not connect to {where}", curl_code=code, bytes_received=nbytes)
    if code == pycurl.E_OPERATION_TIMEDOUT:
        what = "idle timeout" if "too slow" in text.lower() else "timeout"
        return TimeoutError_(f"{what}: {where}", curl_code=code, bytes_received=nbytes, delivered=delivered)
    if code in _RESET_CODES or code == _HTTP2_STREAM_ERROR:
        return TransportError(
            f"connection broken: {where}", curl_code=code, bytes_received=nbytes, delivered=delivered
        )
    return TransportError(f"transfer failed: {where}", curl_code=code, bytes_received=nbytes, delivered=delivered)


_safe_url = mask_url  # (one masking helper: config.mask_url)


def _origin(url: str) -> Tuple[str, str, Optional[int]]:
    """(scheme, host, port) of an http(s) URL, the default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _with_userinfo(url: str, endpoint: str) -> str:
    """``url`` with the ``user:pass@`` of ``endpoint`` (a same-origin redirect keeps them)."""
    ep = urlsplit(endpoint)
    parts = urlsplit(url)
    if "@" not in ep.netloc or "@" in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=ep.netloc.rsplit("@", 1)[0] + "@" + parts.netloc))


class Call:
    """One HTTP attempt of one streamed chat request on one easy handle."""

    def __init__(
        self,
        handle: "pycurl.Curl",
        cfg: ModelConfig,
        body: Optional[bytes],
        decoder: Decoder,
        *,
        deadline: float,
        url: Optional[str] = None,
        method: str = "POST",
        streaming: bool = True,
        progress: bool = True,
        redirects: int = 0,
    ) -> None:
        self.handle = handle
        self.cfg = cfg
        self.decoder = decoder
        if getattr(decoder, "keeps_call", False):
            # Opt-in (the drop-in's with_raw_response): the decoder gets this
            # attempt, to read the response's status and headers afterwards.
            decoder.call = self  # type: ignore[attr-defined]
        # A decoder with feed_bytes() owns its splitter (the chat fast path);
        # any other gets batches from a splitter of the Call's own.
        feed_bytes = getattr(decoder, "feed_bytes", None)
        splitter = getattr(decoder, "splitter", None)
        if feed_bytes is None or splitter is None:
            splitter = EventSplitter(cfg.max_event_bytes)
            feed_bytes = lambda chunk: decoder.feed(*splitter.feed_raw(chunk))  # noqa: E731
        self.splitter = splitter
        self._feed = feed_bytes
        self.url = url or cfg.url
        #: redirects followed before this attempt (ModelConfig.follow_redirects)
        self.redirects = redirects
        # Credentials (the key, secret headers, user:pass@) belong to the
        # configured server: a redirect to another scheme, host or port gets none.
        # (cfg.url is the endpoint's own origin by construction)
        self.same_origin = url is None or _origin(self.url) == _origin(cfg.endpoint)
        if self.same_origin and redirects:
            self.url = _with_userinfo(self.url, cfg.endpoint)
        self._key: Optional[str] = None
        self.status: Optional[int] = None
        self.mode = 0  # 0: before the first byte; 1: event stream; 2: error body; 3: plain body
        self.nbytes = 0
        self.exc: Optional[BaseException] = None
        self.body_parts: List[bytes] = []
        self.body_len = 0
        self.body_truncated = False
        self.header_lines: List[bytes] = []  # the last response's (its status line first)
        self.streaming = streaming
        self.method = method
        self.idle_s = None if cfg.idle_timeout_ms is None else cfg.idle_timeout_ms / 1000.0
        self.idle_fired = False
        self._last_dlnow = -1
        self._idle_since: Optional[float] = None
        self._setup(handle, method, body, deadline, progress)

    # -- setup -------------------------------------------------------------
    def _setup(self, c: "pycurl.Curl", method: str, body: Optional[bytes], deadline: float, progress: bool) -> None:
        cfg = self.cfg
        c.reset()  # keeps the connection cache: keep-alive survives
        c.setopt(pycurl.URL, self.url)
        headers = ["Accept: text/event-stream" if self.streaming else "Accept: application/json"]
        if body is not None:
            c.setopt(pycurl.POST, 1)
            c.setopt(pycurl.POSTFIELDS, body)
            c.setopt(pycurl.POSTFIELDSIZE, len(body))
            headers.append("Content-Type: application/json")
            headers.append("Expect:")  # no 100-continue round trip for large bodies
        if method != ("POST" if body is not None else "GET"):
            c.setopt(pycurl.CUSTOMREQUEST, method)
        key = cfg.api_key()  # (raises ConfigError for a key with a line break in it)
        for k, v in cfg.headers.items():
            check_header(k, v)  # again: a mapping may have changed since ModelConfig checked it
            if self.same_origin or k.lower() not in SECRET_HEADERS:
                headers.append(f"{k}: {v}")
        if key and self.same_origin:
            self._key = key
            headers.append(f"Authorization: Bearer {key}")
        c.setopt(pycurl.HTTPHEADER, headers)
        c.setopt(pycurl.WRITEFUNCTION, self.write)
        c.setopt(pycurl.HEADERFUNCTION, self.header)
        c.setopt(pycurl.NOSIGNAL, 1)
        if progress:
            # In easy.perform() curl calls the progress function several times a
            # second even when no byte arrives: it measures the idle timeout, and
            # it is when Python gets to run a pending KeyboardInterrupt (pycurl
            # aborts the transfer and re-raises it from perform(); without it
            # Ctrl-C on a stalled server would wait for a timeout). The multi
            # engines return to Python on their own and time the idle gap there.
            c.setopt(pycurl.NOPROGRESS, 0)
            c.setopt(pycurl.XFERINFOFUNCTION, self.progress)
        c.setopt(pycurl.BUFFERSIZE, _BUFFER_SIZE)
        c.setopt(pycurl.ACCEPT_ENCODING, "gzip, deflate")
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        c.setopt(pycurl.TIMEOUT_MS, remaining_ms)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, min(cfg.connect_timeout_ms, remaining_ms))
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        # Redirects are never followed by curl, which would send every custom
        # header (X-Api-Key ...) to whatever host the Location names: with
        # follow_redirects, finish() returns the next URL and the caller starts
        # a new Call for it, whose headers are chosen for that hop's origin.
        # (FOLLOWLOCATION 0, SSL_VERIFYPEER 1 and SSL_VERIFYHOST 2 are what
        # reset() left: curl's defaults.)
        if cfg.verify:
            if cfg.ca_bundle:
                c.setopt(pycurl.CAINFO, cfg.ca_bundle)
        else:
            c.setopt(pycurl.SSL_VERIFYPEER, 0)
            c.setopt(pycurl.SSL_VERIFYHOST, 0)

    # -- the progress callback (per curl loop turn, and a few times a second) ---
    def progress(self, dltotal: int, dlnow: int, ultotal: int, ulnow: int) -> Optional[int]:
        """curl's progress callback: returns 1 (abort) once no byte came for the idle timeout."""
        # While bytes flow this is one comparison: the clock is read only once
        # the count stops moving, to time the idle gap.
        if dlnow != self._last_dlnow:
            self._last_dlnow = dlnow
            self._idle_since = None
            return None
        if self.idle_s is None:
            return None
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= self.idle_s:
            self.idle_fired = True
            return 1  # abort: finish() raises TimeoutError_
        return None

    # -- the write callback (per network chunk) ---------------------------------
    def write(self, chunk: bytes) -> Optional[int]:
        """curl's write callback: an event-stream chunk goes to the decoder, any other body is kept
        (bounded). Returns 0 (abort) on an error, which :meth:`finish` raises."""
        # The per-chunk path: nothing but the decoder (bytes are counted by
        # curl, read in finish()).
        if self.mode == 1:
            try:
                self._feed(chunk)
            except BaseException as e:  # noqa: BLE001 - re-raised by finish()
                self.exc = e
                return 0
            return None
        return self._write_slow(chunk)

    def _write_slow(self, chunk: bytes) -> Optional[int]:
        try:
            if self.mode == 0:
                self._first_bytes()
            if self.mode == 1:
                self._feed(chunk)
                return None
            self._keep_body(chunk)
            if self.body_truncated:
                return 0  # the bounded part is kept; stop reading (finish() reports it)
            return None
        except BaseException as e:  # noqa: BLE001 - re-raised by finish()
            self.exc = e
            return 0

    def header(self, line: bytes) -> Optional[int]:
        """curl's header callback: keeps each raw line; a status line starts a new block."""
        # Called per header line (pycurl forbids getinfo() during perform()):
        # kept raw, read when needed (content_type, location, an error's
        # headers). Like write(), it never lets an exception escape into pycurl.
        try:
            if line[:5] == b"HTTP/":
                # A new status line (redirect, 100 Continue) starts a new header block.
                parts = line.split(None, 2)
                try:
                    self.status = int(parts[1])
                except (IndexError, ValueError):
                    self.status = None
                self.header_lines = [line]
            else:
                self.header_lines.append(line)
            return None
        except BaseException as e:  # noqa: BLE001 - re-raised by finish()
            self.exc = e
            return 0

    @property
    def headers_complete(self) -> bool:
        """The final response's header block ended (its blank line came), so
        :meth:`response_headers` has all of them."""
        lines = self.header_lines
        status = self.status
        return bool(lines) and not lines[-1].strip() and status is not None and status >= 200

    def _header_fields(self) -> List[Tuple[bytes, bytes]]:
        """(lower-case name, value) of the last response's header lines."""
        out = []
        for line in self.header_lines:
            if line[:5] == b"HTTP/":
                continue
            name, sep, value = line.partition(b":")
            if sep:
                out.append((name.strip().lower(), value.strip()))
        return out

    def _header_value(self, name: bytes) -> Optional[str]:
        """The last response's header ``name`` (lower case; the last one sent), or None."""
        found = None
        for k, v in self._header_fields():
            if k == name:
                found = v
        return None if found is None else found.decode("latin-1")

    @property
    def content_type(self) -> str:
        """The response's Content-Type, lower-cased (``""`` when none)."""
        v = self._header_value(b"content-type")
        return v.lower() if v is not None else ""

    @property
    def location(self) -> Optional[str]:
        """The response's Location header, if any."""
        return self._header_value(b"location")

    def _first_bytes(self) -> None:
        status = self.status or 0
        self.decoder.result.status = self.status
        ctype = self.content_type
        if not 200 <= status < 300:
            self.mode = 2
        elif self.streaming and ("text/event-stream" in ctype or not ctype):
            self.mode = 1
        else:
            self.mode = 3

    def _plain_body_limit(self) -> int:
        """The bound of a non-event-stream 2xx body: one event's (``max_event_bytes``)
        when a stream was asked for; for a plain request (``streaming=False``:
        JSON endpoints, embeddings of many inputs) at least ``MIN_JSON_BODY_BYTES``."""
        limit = self.cfg.max_event_bytes
        return limit if self.streaming else max(limit, MIN_JSON_BODY_BYTES)

    def _keep_body(self, chunk: bytes) -> None:
        limit = self.cfg.max_error_body_bytes if self.mode == 2 else self._plain_body_limit()
        room = limit - self.body_len
        if len(chunk) > room:
            chunk = chunk[: max(room, 0)]
            self.body_truncated = True
        if chunk:
            self.body_parts.append(chunk)
            self.body_len += len(chunk)

    @property
    def delivered(self) -> bool:
        """Whether any delta reached the caller (then a retry would repeat text)."""
        r = self.decoder.result
        return r.deltas > 0 or r.finish_reason is not None

    # -- after the transfer ---------------------------------------------------
    def finish(self, curl_error: Optional[pycurl.error]) -> Optional[str]:
        """Raise what this attempt ended with, or return on success: ``None``,
        or the URL to send the request to next (a redirect to follow, with
        ``ModelConfig.follow_redirects``: start a new Call for it with
        ``redirects=self.redirects + 1``).

        Any secret the request carried (the key, custom auth headers) is
        replaced by ``***`` in the error, even when the server echoed it."""
        try:
            return self._finish(curl_error)
        except BrokerError as err:
            _redact(err, self._secrets())
            raise

    def _secrets(self) -> List[str]:
        out = []
        key = self._key
        if key is None:
            try:
                key = self.cfg.api_key()
            except ConfigError:
                key = None
        if key:
            out.append(key)
        for k, v in self.cfg.headers.items():
            if k.lower() in SECRET_HEADERS:
                out.append(v)
                if " " in v:
                    out.append(v.split(" ", 1)[1])  # the token of "Bearer <token>"
        return [x for x in out if len(x) >= 4]

    def _finish(self, curl_error: Optional[pycurl.error]) -> Optional[str]:
        try:
            self.nbytes = int(self.handle.getinfo(pycurl.SIZE_DOWNLOAD_T))
        except (pycurl.error, AttributeError):  # pragma: no cover - very old pycurl
            self.nbytes = 0
        if self.exc is not None:
            raise self.exc
        if self.mode == 0 and self.status is not None and not 200 <= self.status < 300:
            self.mode = 2  # a status without a body
        if self.mode == 2:
            if self.cfg.follow_redirects and self.status in _REDIRECT_STATUSES and self.location:
                return self._next_hop()
            raise self._api_error()
        if self.mode == 0 and not self.streaming and curl_error is None and not self.idle_fired:
            self.mode = 3  # a 2xx with an empty body (an idle timeout is raised below)
        if self.mode == 3:
            if self.body_truncated:
                raise ProtocolError(
                    f"non-event-stream body over {self._plain_body_limit()} bytes (max_event_bytes "
                    f"{self.cfg.max_event_bytes}) from {_safe_url(self.url)}"
                )
            if curl_error is None:
                self.decoder.feed_whole(b"".join(self.body_parts))
                return None
        res = self.decoder.result
        if self.idle_fired:
            raise TimeoutError_(
                f"idle timeout: no byte for {self.cfg.idle_timeout_ms} ms from {self.method} "
                f"{_safe_url(self.url)} ({self.nbytes} bytes received)",
                curl_code=getattr(pycurl, "E_ABORTED_BY_CALLBACK", 42),
                bytes_received=self.nbytes,
                delivered=self.delivered,
            )
        if curl_error is not None:
            code, text = curl_error.args[0], str(curl_error.args[1]) if len(curl_error.args) > 1 else ""
            if res.done or (res.finish_reason is not None and code in _RESET_CODES):
                return None  # everything was delivered; the connection just did not end cleanly
            raise translate_curl_error(
                code,
                text,
                url=_safe_url(self.url),
                nbytes=self.nbytes,
                delivered=self.delivered,
                phase=self.method,
            ) from curl_error
        self.splitter.close()
        if not res.done and res.finish_reason is None:
            raise TransportError(
                f"stream ended early: the server closed the stream without [DONE] or a finish_reason "
                f"after {res.events} events and {self.nbytes} bytes ({_safe_url(self.url)})",
                bytes_received=self.nbytes,
                delivered=self.delivered,
            )
        return None

    def _next_hop(self) -> str:
        """The absolute URL of a redirect to follow (http or https only, at most
        MAX_REDIRECTS per request)."""
        assert self.location is not None
        target = urldefrag(urljoin(self.url, self.location))[0]
        if urlsplit(target).scheme.lower() not in ("http", "https"):
            raise APIError(f"redirect to a non-HTTP URL refused: {_safe_url(target)}", status=self.status)
        if self.redirects >= MAX_REDIRECTS:
            raise TransportError(
                f"too many redirects: more than {MAX_REDIRECTS} from {_safe_url(self.url)}",
                curl_code=getattr(pycurl, "E_TOO_MANY_REDIRECTS", 47),
                bytes_received=self.nbytes,
            )
        return target

    def response_headers(self) -> Headers:
        """The last response's headers, error or success (any secret the request
        carried masked); complete once the first body byte arrived or the
        attempt finished."""
        secrets = self._secrets()
        pairs = []
        for line in self.header_lines:
            if line[:5] == b"HTTP/" or b":" not in line:
                continue
            name, _, value = line.decode("latin-1").partition(":")
            value = value.strip()
            for sec in secrets:
                value = value.replace(sec, "***")
            pairs.append((name.strip(), value))
        return Headers(pairs)

    def _api_error(self) -> APIError:
        err = self._api_error_from_body()
        err.headers = self.response_headers()
        return err

    def _api_error_from_body(self) -> APIError:
        raw_bytes = b"".join(self.body_parts)
        raw = raw_bytes.decode("utf-8", "replace")
        status = self.status
        if 300 <= (status or 0) < 400:
            where = _safe_url(self.location) if self.location else "(no Location)"
            why = "not a redirect to follow" if self.cfg.follow_redirects else "ModelConfig.follow_redirects is off"
            return APIError(f"redirect to {where} not followed ({why})", status=status, body=raw or None)
        body: Any
        try:
            body = json.loads(raw_bytes) if raw_bytes else None
        except ValueError:
            body = None
        suffix = " (body truncated)" if self.body_truncated else ""
        if body is not None:
            err = api_error_from_body(body, status, raw + suffix)
            if isinstance(body, dict) and ("error" in body or "message" in body):
                return err
        message = raw.strip() or f"HTTP {status} with an empty body"
        return APIError(message + suffix, status=status, body=raw or None)
