"""A small OpenAI-compatible HTTP endpoint in front of a continuous-batching `Server`.

    server = kvjax.systems.Server(model, max_prompt_tokens=1024, max_new_tokens=128,
                                  memory_budget_bytes=256 << 20, method="snapkv", budget=128)
    with kvjax.systems.serve_http(server, port=8000) as endpoint:
      ...   # POST endpoint.url + "/v1/completions" {"prompt": "...", "max_tokens": 32}

Routes: POST /v1/completions (prompt: text or token ids), POST /v1/chat/completions
(messages, rendered with the model's chat template), GET /v1/models. Each HTTP request
is handled on its own thread and submitted to the server; one worker thread runs the
server, so requests that arrive while others decode join the same batch at the next
admission. Temperature and top_p are the server's (fixed when it is made): a request asking
for other values is refused rather than silently served differently. A request's `seed`
makes its draws those of `kvjax.generate(..., seed=seed)` for its prompt alone.
No streaming, no authentication: bind it to localhost or put a proxy in front.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

from kvjax import validation
from kvjax.errors import KvjaxError
from kvjax.systems.scheduler import Server

MAX_BODY_BYTES = 8 << 20


class RequestError(KvjaxError):
  """A request the endpoint refuses (HTTP 400)."""


class ServerFailure(Exception):
  """The server failed while serving a request (HTTP 500); `cause` says why."""

  def __init__(self, cause: BaseException | str):
    super().__init__(cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}")
    self.cause = cause


class Closing(Exception):
  """The endpoint is shutting down (HTTP 503)."""


class Endpoint:
  """The running endpoint: `url`, `close()`; a context manager."""

  def __init__(self, server: Server, host: str, port: int):
    if not isinstance(server, Server):
      raise KvjaxError(f"server must be a kvjax.systems.Server; got {validation.show(server)}")
    self.server = server
    self.model_name = server.model.name or "kvjax"
    self._done: dict = {}
    self._waiting: dict = {}
    self._wake = threading.Condition()
    self._closing = False
    server.on_finish = self._finished
    self._http = http.server.ThreadingHTTPServer((host, port), _handler(self))
    self._http.daemon_threads = True
    self.url = f"http://{host}:{self._http.server_address[1]}"
    self._threads = [threading.Thread(target=self._http.serve_forever, daemon=True),
                     threading.Thread(target=self._work, daemon=True)]
    for t in self._threads:
      t.start()

  def __enter__(self) -> "Endpoint":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Stops accepting requests and joins the threads."""
    self._http.shutdown()
    self._http.server_close()
    with self._wake:
      self._closing = True
      self._wake.notify_all()
    for t in self._threads:
      t.join(timeout=60)

  def _work(self) -> None:
    """Runs the server whenever requests wait; a failed run fails every request waiting
    (and takes them out of the queue, so it is not retried forever)."""
    while True:
      with self._wake:
        while not self.server._queue and not self._closing:
          self._wake.wait()
        if self._closing:
          self._fail_waiting(Closing("the endpoint is shutting down"))
          return
      try:
        self.server.run()
      except Exception as err:   # every waiting request learns why, none hangs
        with self._wake:
          self._fail_waiting(ServerFailure(err))

  def _fail_waiting(self, error: Exception) -> None:
    """(Holding the lock.) Every waiting request ends with `error`."""
    failed = set(self._waiting) - set(self._done)
    for request in failed:
      self._done[request] = error
    queue = self.server._queue
    keep = [r for r in queue if r not in failed]
    queue.clear()
    queue.extend(keep)
    for request in failed:
      self.server.forget(request)
    self._wake.notify_all()

  def _finished(self, served) -> None:
    # The answer is handed to its waiting handler; the server keeps nothing of it.
    self.server.forget(served.id)
    with self._wake:
      if served.id in self._waiting and served.id not in self._done:
        self._done[served.id] = served
        self._wake.notify_all()

  def generate(self, prompt, max_tokens: int, seed: int | None = None):
    """Submits a prompt and waits for it (called on a handler thread)."""
    with self._wake:
      if self._closing:
        raise Closing("the endpoint is shutting down")
      request = self.server.submit(prompt, max_tokens, seed=seed)
      self._waiting[request] = True
      self._wake.notify_all()
      while request not in self._done:
        self._wake.wait()
      del self._waiting[request]
      result = self._done.pop(request)
    if isinstance(result, Exception):
      raise result
    if result.error is not None:   # its own prefill failed; the server served on
      raise ServerFailure(result.error)
    return result


def serve_http(server: Server, host: str = "127.0.0.1", port: int = 8000) -> Endpoint:
  """Starts the endpoint in background threads (port 0: any free port, see `.url`)."""
  validation.integer("port", port, 0, 65535, error=KvjaxError, what="0 = any free port")
  return Endpoint(server, host, port)


# OpenAI parameters this endpoint does not implement, with the value that means "unused".
UNSUPPORTED = {"n": 1, "stream": False, "stop": None, "logprobs": None,
               "top_logprobs": None, "echo": False, "best_of": 1, "logit_bias": None,
               "presence_penalty": 0, "frequency_penalty": 0, "suffix": None, "tools": None,
               "response_format": None}


def _sampling_check(body: dict, server: Server) -> None:
  """Refuses sampling settings the server does not use and parameters it does not
  implement (rather than serving the request differently from what it asked)."""
  fixed = {"temperature": server.sampling["temperature"], "top_p": server.sampling["top_p"]}
  for name, value in fixed.items():
    if body.get(name) is None:
      continue
    given = body[name]
    if isinstance(given, bool) or not isinstance(given, (int, float)) or \
        float(given) != float(value):
      raise RequestError(f"{name}={given!r}: this server samples with {name}={value} "
                         f"(set when it was started)")
  for name, unused in UNSUPPORTED.items():
    value = body.get(name)
    if value is None or value is False or value in ([], {}) or value == unused:
      continue
    raise RequestError(f"{name}={value!r} is not supported by this endpoint")


def _seed(body: dict) -> int | None:
  value = body.get("seed")
  if value is None:
    return None
  return validation.integer("seed", value, validation.INT64_MIN, validation.INT64_MAX,
                            error=RequestError)


def _max_tokens(body: dict, server: Server) -> int:
  value = body.get("max_tokens", body.get("max_completion_tokens", server.max_new_tokens))
  if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= server.max_new_tokens:
    raise RequestError(f"max_tokens={value!r} must be an integer in [1, "
                       f"{server.max_new_tokens}] (the server's max_new_tokens)")
  return value


def _choice_reason(served, max_tokens: int) -> str:
  return "length" if len(served.token_ids) >= max_tokens else "stop"


def _usage(served) -> dict:
  return {"prompt_tokens": served.prompt_tokens, "completion_tokens": len(served.token_ids),
          "total_tokens": served.prompt_tokens + len(served.token_ids)}


def completion(endpoint: Endpoint, body: dict) -> dict:
  """POST /v1/completions."""
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]   # a batch of one
  if not (isinstance(prompt, str) and prompt) and not (
      isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
    raise RequestError("prompt must be a non-empty string or list of token ids (one prompt "
                       "per request)")
  _sampling_check(body, endpoint.server)
  max_tokens, seed = _max_tokens(body, endpoint.server), _seed(body)
  tokenizer = endpoint.server.model.tokenizer
  if isinstance(prompt, str):
    if tokenizer is None:
      raise RequestError("this model has no tokenizer: send the prompt as token ids")
    prompt = tokenizer.encode(prompt)   # raw text: no chat template on this route
  served = endpoint.generate(prompt, max_tokens, seed)
  return {"id": f"cmpl-{served.id}", "object": "text_completion", "created": int(time.time()),
          "model": endpoint.model_name,
          "choices": [{"index": 0, "text": served.text, "logprobs": None,
                       "finish_reason": _choice_reason(served, max_tokens)}],
          "usage": _usage(served)}


def chat_completion(endpoint: Endpoint, body: dict) -> dict:
  """POST /v1/chat/completions: the messages rendered by the model's chat template."""
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str)
      and isinstance(m.get("content"), str) for m in messages):
    raise RequestError("messages must be a non-empty list of {\"role\": str, \"content\": "
                       "str}")
  tokenizer = endpoint.server.model.tokenizer
  if tokenizer is None or not tokenizer.has_chat_template:
    raise RequestError("this model has no chat template: use /v1/completions")
  _sampling_check(body, endpoint.server)
  max_tokens, seed = _max_tokens(body, endpoint.server), _seed(body)
  rendered = tokenizer.apply_chat_template(
      [{"role": m["role"], "content": m["content"]} for m in messages],
      add_generation_prompt=True)
  # The rendered text carries its special tokens: encode it without adding more.
  served = endpoint.generate(tokenizer.encode(rendered, add_special_tokens=False), max_tokens,
                             seed)
  return {"id": f"chatcmpl-{served.id}", "object": "chat.completion",
          "created": int(time.time()), "model": endpoint.model_name,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": served.text},
                       "finish_reason": _choice_reason(served, max_tokens)}],
          "usage": _usage(served)}


ROUTES = {"/v1/completions": completion, "/v1/chat/completions": chat_completion}


def _handler(endpoint: Endpoint):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):   # quiet: the server keeps its own stats
      del format, args

    def _reply(self, status: int, payload: dict) -> None:
      data = json.dumps(payload).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error"):
      self._reply(status, {"error": {"message": message, "type": kind}})

    def do_GET(self):
      if self.path.rstrip("/") == "/v1/models":
        return self._reply(200, {"object": "list", "data": [
            {"id": endpoint.model_name, "object": "model", "owned_by": "kvjax"}]})
      self._error(404, f"no route GET {self.path}")

    def do_POST(self):
      route = ROUTES.get(self.path.rstrip("/"))
      try:
        length = int(self.headers.get("Content-Length") or 0)
      except ValueError:
        length = -1
      if not 0 <= length <= MAX_BODY_BYTES:
        self.close_connection = True   # the unread body must not be read as a request
        return self._error(413 if length > 0 else 400,
                           f"Content-Length {self.headers.get('Content-Length')!r}: give "
                           f"the body's size, at most {MAX_BODY_BYTES} bytes")
      raw = self.rfile.read(length)
      if route is None:
        return self._error(404, f"no route POST {self.path}")
      try:
        body = json.loads(raw or b"{}")
        if not isinstance(body, dict):
          raise ValueError("the body must be a JSON object")
      except ValueError as err:
        return self._error(400, f"invalid JSON: {err}")
      try:
        self._reply(200, route(endpoint, body))
      except Closing as err:
        self._error(503, str(err), "server_error")
      except ServerFailure as err:
        self._error(500, str(err), "server_error")
      except KvjaxError as err:   # bad input the library names (RequestError included)
        self._error(400, str(err))
      except Exception as err:
        self._error(500, f"{type(err).__name__}: {err}", "server_error")

  return Handler
