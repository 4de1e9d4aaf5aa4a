"""The OpenAI-compatible HTTP endpoint (kvjax/systems/endpoint.py), driven by a real HTTP
client against localhost: replies equal `kvjax.generate`, concurrent requests are batched
without changing tokens, and bad requests get 4xx answers that say why."""

import http.client
import json
import threading

import pytest

import kvjax
from kvjax.systems import Server, serve_http
from tiny import tiny_chat_model

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):",
           "Water boils at"]


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer)


@pytest.fixture()
def endpoint(model):
  server = Server(model, max_prompt_tokens=64, max_new_tokens=8, max_rows=3,
                  eos_token_ids=[])
  with serve_http(server, port=0) as running:
    yield running


def _call(endpoint, method, path, body=None, raw=None):
  host, port = endpoint.url.removeprefix("http://").split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=300)
  data = raw if raw is not None else (None if body is None else json.dumps(body))
  conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  payload = json.loads(response.read())
  conn.close()
  return response.status, payload


def _want(model, prompt, n, chat=False):
  return kvjax.generate(model, prompt, max_new_tokens=n, chat_template=chat,
                        eos_token_ids=[]).texts[0]


def test_completion_equals_generate(endpoint, model):
  status, reply = _call(endpoint, "POST", "/v1/completions",
                        {"model": "any", "prompt": PROMPTS[0], "max_tokens": 6})
  assert status == 200, reply
  assert reply["object"] == "text_completion"
  (choice,) = reply["choices"]
  assert choice["text"] == _want(model, PROMPTS[0], 6)
  assert choice["finish_reason"] == "length"
  prompt_tokens = len(model.tokenizer.encode(PROMPTS[0]))
  assert reply["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 6,
                            "total_tokens": prompt_tokens + 6}
  ids = model.tokenizer.encode(PROMPTS[1])
  status, reply = _call(endpoint, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 4})
  assert status == 200 and reply["choices"][0]["text"] == _want(model, [ids], 4)


def test_concurrent_requests_share_the_batch_and_keep_their_tokens(endpoint, model):
  replies = [None] * len(PROMPTS)

  def ask(i):
    replies[i] = _call(endpoint, "POST", "/v1/completions",
                       {"prompt": PROMPTS[i], "max_tokens": 8, "temperature": 0})

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for prompt, (status, reply) in zip(PROMPTS, replies):
    assert status == 200, reply
    assert reply["choices"][0]["text"] == _want(model, prompt, 8)
  assert len({r["id"] for _, r in replies}) == len(PROMPTS)
  # A long-lived endpoint keeps nothing of the requests it has answered.
  assert endpoint.server._requests == {} and endpoint.server._results == {}


def test_chat_completion_uses_the_chat_template(endpoint, model):
  status, reply = _call(endpoint, "POST", "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": PROMPTS[3]}],
                         "max_tokens": 5})
  assert status == 200, reply
  message = reply["choices"][0]["message"]
  assert message["role"] == "assistant"
  assert message["content"] == _want(model, PROMPTS[3], 5, chat=True)


def test_models_and_bad_requests(endpoint):
  status, reply = _call(endpoint, "GET", "/v1/models")
  assert status == 200 and len(reply["data"]) == 1
  cases = [
      ("POST", "/v1/completions", None, b"{not json", 400, "invalid JSON"),
      ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 99}, None, 400, "max_tokens=99"),
      ("POST", "/v1/completions", {"prompt": "x", "temperature": 0.7}, None, 400,
       "temperature=0.7"),
      ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, None, 400,
       "temperature='hot'"),
      ("POST", "/v1/completions", {"prompt": "x", "stop": ["\n"]}, None, 400, "stop="),
      ("POST", "/v1/completions", {"prompt": "x", "seed": "7"}, None, 400, "seed='7'"),
      ("POST", "/v1/completions", {"prompt": "x", "seed": 2**63}, None, 400, "seed="),
      ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                        "seed": True}, None, 400, "seed=True"),
      ("POST", "/v1/completions", {"prompt": "x", "stream": True}, None, 400, "stream="),
      ("POST", "/v1/completions", {"prompt": ""}, None, 400, "prompt must be"),
      ("POST", "/v1/completions", {"prompt": "word " * 200}, None, 400, "max_prompt_tokens"),
      ("POST", "/v1/chat/completions", {"messages": "hi"}, None, 400, "messages must be"),
      ("POST", "/v1/embeddings", {"input": "x"}, None, 404, "no route"),
      ("GET", "/v2/models", None, None, 404, "no route"),
  ]
  for method, path, body, raw, want_status, match in cases:
    status, reply = _call(endpoint, method, path, body, raw)
    assert status == want_status, (path, body, reply)
    assert match in reply["error"]["message"], reply
  # The endpoint still serves after refusing.
  status, _ = _call(endpoint, "POST", "/v1/completions", {"prompt": "ok", "max_tokens": 1})
  assert status == 200


def test_a_failing_run_fails_its_requests_and_the_endpoint_recovers(endpoint, model,
                                                                    monkeypatch):
  real_run, calls = endpoint.server.run, []

  def fail_once():
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("device lost")
    return real_run()

  monkeypatch.setattr(endpoint.server, "run", fail_once)
  status, reply = _call(endpoint, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
  assert status == 500 and "device lost" in reply["error"]["message"]
  status, reply = _call(endpoint, "POST", "/v1/completions",
                        {"prompt": PROMPTS[2], "max_tokens": 3})
  assert status == 200 and reply["choices"][0]["text"] == _want(model, PROMPTS[2], 3)
  assert len(calls) == 2   # the failed request was not retried
  assert endpoint.server._requests == {} and endpoint.server._results == {}


def test_sampled_requests_follow_their_seed(model):
  """With temperature > 0 a request's `seed` gives generate's draws for that seed, also
  when requests run concurrently in one batch."""
  server = Server(model, max_prompt_tokens=64, max_new_tokens=8, max_rows=3,
                  eos_token_ids=[], temperature=0.8)
  seeds = [3, 3, 40, 2**40]
  replies = [None] * len(PROMPTS)

  def ask(i):
    replies[i] = _call(running, "POST", "/v1/completions",
                       {"prompt": PROMPTS[i], "max_tokens": 8, "seed": seeds[i]})

  with serve_http(server, port=0) as running:
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  for prompt, seed, (status, reply) in zip(PROMPTS, seeds, replies):
    assert status == 200, reply
    want = kvjax.generate(model, prompt, max_new_tokens=8, chat_template=False,
                          eos_token_ids=[], temperature=0.8, seed=seed).texts[0]
    assert reply["choices"][0]["text"] == want
  assert replies[0][1]["choices"][0]["text"] != _want(model, PROMPTS[0], 8)


def test_a_request_whose_prefill_fails_gets_500_alone(endpoint, model, monkeypatch):
  from kvjax.systems import scheduler
  real_prefill = scheduler.context.prefill

  def prefill(model, tokens, *args, **kwargs):
    if (tokens == 49001).any():     # a prompt holding token 49001 cannot be prefilled
      raise RuntimeError("poisoned prompt")
    return real_prefill(model, tokens, *args, **kwargs)

  monkeypatch.setattr(scheduler.context, "prefill", prefill)
  status, reply = _call(endpoint, "POST", "/v1/completions", {"prompt": [49001], "max_tokens": 2})
  assert status == 500 and reply["error"]["message"] == "RuntimeError: poisoned prompt"
  status, reply = _call(endpoint, "POST", "/v1/completions",
                        {"prompt": PROMPTS[1], "max_tokens": 3})
  assert status == 200 and reply["choices"][0]["text"] == _want(model, PROMPTS[1], 3)
  assert endpoint.server._requests == {} and endpoint.server._results == {}


def test_finish_reason_stop_and_requests_after_close(model):
  eos = kvjax.generate(model, PROMPTS[0], max_new_tokens=1, chat_template=False,
                       eos_token_ids=[]).token_ids[0][0]
  server = Server(model, max_prompt_tokens=64, max_new_tokens=8, max_rows=2,
                  eos_token_ids=[eos])
  with serve_http(server, port=0) as running:
    status, reply = _call(running, "POST", "/v1/completions",
                          {"prompt": PROMPTS[0], "max_tokens": 8})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == 0
  from kvjax.systems.endpoint import Closing
  with pytest.raises(Closing):
    running.generate([1, 2, 3], 2)
