"""The API judges' client: one chat-completions call to an OpenAI-compatible endpoint, fit for a long unattended
evaluation (hundreds of calls, flaky networks, a key that must not leak).

Choice: the official `openai` package makes the HTTP call (optional dependency, imported only when an API judge
is built: `pip install openai`). It brings typed errors per status, a maintained HTTP stack and its handling of
the key. Four things it does not do the way a judge run needs, so this module adds them:
  - redirects: its default HTTP client follows them, and takes the other origin's answer as the verdict. Ours is
    built with `follow_redirects=False`, and any 3xx stops the run (the key is only ever sent to --api_base_url);
  - a bound on the whole call: its timeouts bound each socket operation, so a server that trickles bytes holds a
    call forever. A deadline network backend (below) bounds connect + send + headers + body together;
  - retry policy: its own retries are turned off (max_retries=0) and done here, so that a malformed 200 (not
    JSON, not the chat-completions shape) is retried like a 5xx, Retry-After is honoured up to our cap (not
    "give up" above two minutes), and the back-off is a flag;
  - fatal errors: 401 / 403 / 404 (wrong key, no access, wrong model or URL) and redirects raise `FatalAPIError`,
    which stops the run; everything else transient ends, after the retries, in `JudgeFailed` for that example.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from typing import Optional

try:  # the HTTP stack the installed `openai` is built on (httpx2 in recent releases, httpx before)
    import httpcore2 as httpcore
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases
    import httpcore
    import httpx

RETRYABLE_STATUS = (408, 409, 429)  # and every 5xx
FATAL_STATUS = {401: "authentication failed: check the key", 403: "permission denied for this key",
                404: "not found: check --api_base_url and --api_model"}


class JudgeFailed(Exception):
    """An example could not be judged (retries used up); the run records it as failed and goes on."""


class FatalAPIError(SystemExit):
    """The endpoint cannot work for any example (bad key, wrong URL or model, a redirect): stop at once."""


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read and write waits at most until its backend's deadline."""

    def __init__(self, stream, backend: "DeadlineBackend"):
        self._stream, self._backend = stream, backend

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        return self._stream.read(max_bytes, self._backend.remaining(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        return self._stream.write(buffer, self._backend.remaining(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        tls = self._stream.start_tls(ssl_context, server_hostname, self._backend.remaining(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls, self._backend)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """The standard socket backend, with one deadline for everything a call does on the network. Calls are made
    one at a time, so one `deadline` attribute (set before each call) is enough."""

    def __init__(self):
        self._backend, self.deadline = httpcore.SyncBackend(), None

    def remaining(self, timeout: Optional[float], error: type) -> Optional[float]:
        if self.deadline is None:
            return timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise error("the whole call took longer than --api_timeout")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = self._backend.connect_tcp(host, port, self.remaining(timeout, httpcore.ConnectTimeout),
                                           local_address, socket_options)
        return _DeadlineStream(stream, self)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):  # pragma: no cover
        return _DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options), self)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _transport(backend: DeadlineBackend):
    """httpx's standard transport, with its connection pool built on the deadline backend (httpx has no public
    argument for the network backend, so the pool it made is replaced by an equal one that has it)."""
    transport = httpx.HTTPTransport(retries=0)
    transport._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), network_backend=backend)
    return transport


def api_key(key_env: str) -> str:
    """The key from the environment, or a one-line error naming the variable (never the key)."""
    key = os.environ.get(key_env)
    if not key:
        raise SystemExit(f"error: the api judge needs an API key in the environment variable {key_env}")
    return key


def retry_after_seconds(headers) -> Optional[float]:
    """The server's Retry-After (seconds, or an HTTP date), or None."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def reply_text(body: bytes) -> str:
    """The assistant's text from a chat-completions body; ValueError if the body is not that shape."""
    data = json.loads(body)
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if not isinstance(content, str):
        raise ValueError("choices[0].message.content is not text")
    return content


class ChatClient:
    """Sends one user message, returns the reply's text. The key is read from the environment at start-up, sent
    only in the Authorization header to --api_base_url, and never printed, logged or written."""

    def __init__(self, base_url: str, model: str, key_env: str, timeout: float, max_retries: int,
                 retry_backoff: float, retry_after_cap: float, max_tokens: int = 256):
        key = api_key(key_env)
        try:
            import openai
        except ImportError:
            raise SystemExit("error: the api judge needs the openai package: pip install openai") from None
        self._openai, self._key = openai, key
        self.endpoint = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_tokens = model, timeout, max_tokens
        self.max_retries, self.retry_backoff, self.retry_after_cap = max_retries, retry_backoff, retry_after_cap
        self.backend = DeadlineBackend()
        http_client = httpx.Client(transport=_transport(self.backend), follow_redirects=False, timeout=timeout)
        self.client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout,
                                    http_client=http_client)

    def _call_once(self, content: str) -> str:
        self.backend.deadline = time.monotonic() + self.timeout
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.model, temperature=0.0, max_tokens=self.max_tokens,
                messages=[{"role": "user", "content": content}])
            return reply_text(raw.content)
        finally:
            self.backend.deadline = None

    def __call__(self, content: str) -> str:
        """The reply text; JudgeFailed once the retries are used up; FatalAPIError when no retry can help."""
        openai, last_error = self._openai, ""
        for attempt in range(self.max_retries + 1):
            server_wait = None
            try:
                return self._call_once(content)
            except openai.APIStatusError as e:
                status = e.status_code
                if 300 <= status < 400:
                    location = e.response.headers.get("location", "?")
                    raise FatalAPIError(f"error: {self.endpoint} answered HTTP {status} redirecting to {location}; "
                                        f"redirects are not followed (the key goes only to --api_base_url)")
                if status in FATAL_STATUS:
                    raise FatalAPIError(f"error: {self.endpoint} answered HTTP {status} ({FATAL_STATUS[status]}); "
                                        f"nothing was recorded")
                last_error = f"HTTP {status}"
                if status < 500 and status not in RETRYABLE_STATUS:
                    break  # e.g. 400 for this one example's request: waiting will not change the answer
                server_wait = retry_after_seconds(e.response.headers)
            except openai.APIConnectionError as e:  # connect / send / read failures, timeouts, cut bodies
                cause = e.__cause__ if e.__cause__ is not None else e
                last_error = f"{type(cause).__name__}: {cause}"
            except ValueError as e:  # a 200 whose body is not JSON or not the chat-completions shape
                last_error = f"malformed response: {e}"
            if attempt < self.max_retries:
                delay = self.retry_backoff * 2**attempt
                if server_wait is not None:  # the server said when; wait that long, up to our cap
                    delay = min(server_wait, self.retry_after_cap)
                time.sleep(delay)
        raise JudgeFailed(last_error.replace(self._key, "***"))
