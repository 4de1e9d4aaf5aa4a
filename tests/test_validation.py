"""Bad input at every public entry (generate, score, converse, method objects, config files)
raises a kvjax error naming the argument, the bad value and what is allowed, before anything
is traced: never a raw JAX/numpy/tokenizers exception, never garbage or NaN output.

Plain tests cover each class of bad input; hypothesis properties generate many more. Every
bad call runs with the compiled prefill patched to fail, so validation provably comes first
and no example compiles anything.
"""

import contextlib
import copy
import dataclasses
import json
import types
import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvjax
from checkpoints_conversion import orbax_io
from kvjax import methods
from kvjax.config import ModelConfig
from kvjax.errors import ConfigError, MethodError
from kvjax.generation import engine, inputs
from tiny import tiny_chat_model, tiny_model

VOCAB = 256  # tiny_model's vocabulary
PROPERTY = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def chat_model(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)


@contextlib.contextmanager
def nothing_runs():
  """Any call that reaches the compiled prefill fails the test."""
  with mock.patch.object(engine.STEPS, "prefill", side_effect=AssertionError("prefill ran")):
    yield


def rejected(call, *words) -> str:
  """The message of the kvjax error `call()` raises before running anything; it must
  contain every word."""
  with nothing_runs(), pytest.raises(kvjax.KvjaxError) as error:
    call()
  message = str(error.value)
  for word in words:
    assert word in message, (word, message)
  return message


# ------------------------------------------------------------------ token ids


@pytest.mark.parametrize("bad", [-1, VOCAB, 2**31, 2**40, -2**70])
def test_token_ids_outside_the_vocabulary(model, bad):
  row = [1, 2, bad, 3]
  rejected(lambda: kvjax.generate(model, row, max_new_tokens=2), f"prompts[0][2]={bad}",
           f"[0, {VOCAB})")
  rejected(lambda: kvjax.generate(model, [[1, 2], [3, bad]]), f"prompts[1][1]={bad}")
  rejected(lambda: kvjax.generate(model, [1, 2], questions=[bad]), f"questions[0][0]={bad}")
  rejected(lambda: kvjax.score(model, row, [4]), f"context[0][2]={bad}")
  rejected(lambda: kvjax.score(model, [4, 5], [bad]), f"continuation[0][0]={bad}")


def test_token_id_arrays(model):
  rejected(lambda: kvjax.generate(model, np.array([1, 2, VOCAB])), f"prompts[0][2]={VOCAB}")
  small = np.array([5, 6, 7], np.uint8)
  assert kvjax.generate(model, small, max_new_tokens=2).token_ids == kvjax.generate(
      model, [5, 6, 7], max_new_tokens=2).token_ids


@st.composite
def row_with_a_bad_id(draw):
  """(token ids with one id outside [0, VOCAB) at `at`, at, that id)."""
  row = draw(st.lists(st.integers(0, VOCAB - 1), max_size=12))
  bad = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=VOCAB)))
  at = draw(st.integers(0, len(row)))
  return row[:at] + [bad] + row[at:], at, bad


@PROPERTY
@given(case=row_with_a_bad_id(),
       where=st.sampled_from(["prompt", "batch", "question", "context", "continuation"]))
def test_property_every_out_of_vocabulary_id_is_named(model, case, where):
  row, at, bad = case
  calls = {
      "prompt": (lambda: kvjax.generate(model, row), f"prompts[0][{at}]"),
      "batch": (lambda: kvjax.generate(model, [[7, 8], row]), f"prompts[1][{at}]"),
      "question": (lambda: kvjax.generate(model, [7, 8], questions=[row]),
                   f"questions[0][{at}]"),
      "context": (lambda: kvjax.score(model, row, [7]), f"context[0][{at}]"),
      "continuation": (lambda: kvjax.score(model, [7], [row]), f"continuation[0][{at}]"),
  }
  call, name = calls[where]
  rejected(call, f"{name}={bad}", f"[0, {VOCAB})")


def test_property_valid_ids_score_finite_without_recompiling(model):
  """Any in-vocabulary context and continuation (up to one bucket long) gives finite
  log-probs <= 0, and all examples share one compiled shape."""
  compiled = []

  @PROPERTY
  @given(context=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=16),
         continuation=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=16))
  def check(context, continuation):
    log_probs = kvjax.score(model, context, continuation)
    assert log_probs.shape == (len(continuation),)
    assert np.isfinite(log_probs).all() and (log_probs <= 0).all()
    compiled.append(len(engine.STEPS._executables))

  check()
  assert len(compiled) > 10 and compiled[-1] == compiled[0]  # nothing compiled after the first


# ------------------------------------------------------------------ argument types


def test_wrong_types_name_the_argument(model):
  prompt = list(range(1, 11))
  cases = [
      (dict(stop=5), "stop=5"),
      (dict(stop=[5]), "stop=[5]"),
      (dict(stop=["ok", ""]), "stop=['ok', '']"),
      (dict(eos_token_ids="a"), "eos_token_ids='a'"),
      (dict(eos_token_ids=[2**70]), f"eos_token_ids[0]={2**70}"),
      (dict(eos_token_ids=[1, VOCAB]), f"eos_token_ids[1]={VOCAB}"),
      (dict(eos_token_ids=2.0), "eos_token_ids=2.0"),
      (dict(seed=2**64), f"seed={2**64}"),
      (dict(seed=-2**63 - 1), "seed="),
      (dict(seed=1.5), "seed=1.5"),
      (dict(chat_template="no"), "chat_template='no' must be True or False"),
      (dict(chat_template=1), "chat_template=1"),
      (dict(max_new_tokens="5"), "max_new_tokens='5'"),
      (dict(questions=5), "questions must be"),
      (dict(questions=[None]), "questions[0]"),
      (dict(temperature=math.inf), "temperature=inf"),
      (dict(top_p=math.nan), "top_p=nan"),
      (dict(prefill_chunk_size="8"), "prefill_chunk_size='8'"),
  ]
  for kwargs, words in cases:
    rejected(lambda: kvjax.generate(model, prompt, **kwargs), words)


def test_one_eos_token_id_is_a_list_of_one(model):
  prompt = list(range(1, 11))
  free = kvjax.generate(model, prompt, max_new_tokens=6).token_ids[0]
  stop_at = free[2]
  want = free[:free.index(stop_at)]
  assert kvjax.generate(model, prompt, max_new_tokens=6, eos_token_ids=stop_at).token_ids == [want]
  assert kvjax.generate(model, prompt, max_new_tokens=6,
                        eos_token_ids=[stop_at]).token_ids == [want]


def test_chat_template_false_is_not_the_string_no(chat_model):
  plain = inputs.encode(chat_model, ["Hello"], None, False).prompts
  assert plain == [chat_model.tokenizer.encode("Hello")]
  assert inputs.encode(chat_model, ["Hello"], None, True).prompts != plain
  for bad in ("no", "False", "", 0):
    rejected(lambda: kvjax.generate(chat_model, "Hello", chat_template=bad), "chat_template=")


# Bad values per argument of generate (token-id prompt of 10 tokens, the tiny model).
BAD_ARGUMENTS = {
    "stop": st.one_of(st.integers(), st.floats(), st.just(""),
                      st.lists(st.integers(), min_size=1, max_size=3),
                      st.lists(st.just(""), min_size=1, max_size=2), st.just({"a": 1})),
    "eos_token_ids": st.one_of(st.text(max_size=4), st.floats(), st.integers(min_value=VOCAB),
                               st.integers(max_value=-1), st.just({1: 2}),
                               st.lists(st.integers(min_value=VOCAB), min_size=1, max_size=3)),
    "seed": st.one_of(st.integers(min_value=2**63), st.integers(max_value=-2**63 - 1),
                      st.floats(), st.text(max_size=4), st.booleans(), st.none()),
    "chat_template": st.one_of(st.text(max_size=4), st.integers(), st.floats()),
    "max_new_tokens": st.one_of(st.text(max_size=4), st.floats(), st.integers(max_value=0),
                                st.booleans(), st.none(), st.integers(min_value=10**6)),
    "temperature": st.one_of(st.floats(max_value=-1e-9),
                             st.sampled_from([math.nan, math.inf]), st.text(max_size=4)),
    "top_p": st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True),
                       st.just(math.nan), st.text(max_size=4)),
    "questions": st.one_of(st.integers(), st.floats(), st.just([]), st.just([[]]),
                           st.lists(st.none(), min_size=1, max_size=2),
                           st.lists(st.floats(), min_size=1, max_size=2)),
    "compression_ratio": st.one_of(st.floats(min_value=1), st.floats(max_value=-1e-9),
                                   st.just(math.nan), st.text(max_size=4)),
    "budget": st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=4),
                        st.integers(min_value=11)),
    "prefill_chunk_size": st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=4)),
    "method": st.one_of(
        st.integers(), st.floats(),
        st.text(max_size=12).filter(lambda s: s.split(":")[0].lower() not in methods.available())),
}


@PROPERTY
@given(case=st.sampled_from(sorted(BAD_ARGUMENTS)).flatmap(
    lambda name: st.tuples(st.just(name), BAD_ARGUMENTS[name])))
def test_property_bad_generate_arguments(model, case):
  name, value = case
  rejected(lambda: kvjax.generate(model, list(range(1, 11)), **{name: value}), name)


# Values that are neither text nor token ids, nor lists of them.
MALFORMED = st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), st.just([]),
                      st.lists(st.none(), min_size=1, max_size=2),
                      st.lists(st.floats(), min_size=1, max_size=2),
                      st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2))


@PROPERTY
@given(case=st.one_of(st.tuples(MALFORMED, st.just([7, 8])), st.tuples(st.just([7, 8]), MALFORMED)))
def test_property_bad_score_inputs(model, case):
  context, continuation = case
  message = rejected(lambda: kvjax.score(model, context, continuation))
  assert "context" in message or "continuation" in message, message


@PROPERTY
@given(case=st.one_of(st.tuples(MALFORMED, st.just(["Why?"])),
                      st.tuples(st.just("Hi"), MALFORMED),
                      st.tuples(st.just(["Hi", "Ho"]), MALFORMED)))
def test_property_bad_converse_inputs(chat_model, case):
  contexts, questions = case
  message = rejected(lambda: kvjax.converse(chat_model, contexts, questions, max_new_tokens=2))
  assert "contexts" in message or "questions" in message, message


# ------------------------------------------------------------------ text


def test_lone_surrogates_are_named(chat_model):
  bad = "caf\udce9 au lait"
  rejected(lambda: kvjax.generate(chat_model, bad), "prompts[0]", "surrogate", "'\\udce9'",
           "character 3")
  rejected(lambda: kvjax.generate(chat_model, ["ok", "ok"], questions=["fine", bad]),
           "questions[1]", "surrogate")
  rejected(lambda: kvjax.generate(chat_model, "ok", stop=bad), "stop", "surrogate")
  rejected(lambda: kvjax.score(chat_model, bad, "ok"), "context[0]", "surrogate")
  rejected(lambda: kvjax.score(chat_model, "ok", bad), "continuation[0]", "surrogate")
  rejected(lambda: kvjax.converse(chat_model, bad, "ok?"), "contexts[0]", "surrogate")
  rejected(lambda: kvjax.converse(chat_model, "ok", ["ok?", bad]), "questions[0][1]",
           "surrogate")


@PROPERTY
@given(text=st.text(max_size=20), surrogate=st.integers(0xD800, 0xDFFF), data=st.data(),
       where=st.sampled_from(["prompt", "question", "context", "continuation", "turn", "stop"]))
def test_property_text_with_a_lone_surrogate(chat_model, text, surrogate, data, where):
  at = data.draw(st.integers(0, len(text)))
  bad = text[:at] + chr(surrogate) + text[at:]
  calls = {
      "prompt": lambda: kvjax.generate(chat_model, bad),
      "question": lambda: kvjax.generate(chat_model, "Hi", questions=bad),
      "context": lambda: kvjax.score(chat_model, bad, "Hi"),
      "continuation": lambda: kvjax.score(chat_model, "Hi", bad),
      "turn": lambda: kvjax.converse(chat_model, "Hi", ["Why?", bad]),
      "stop": lambda: kvjax.generate(chat_model, "Hi", stop=["a", bad]),
  }
  rejected(calls[where], "surrogate", f"character {at}")


def test_empty_question_is_the_same_as_no_question(chat_model):
  """kvpress's question="" convention: an empty question adds nothing, with or without a
  chat template and with compression (the whole rendered prompt is then the context)."""
  prompt, other = "The code word is apple. Remember it well.", "Tell me about the sea."
  for kwargs in (dict(), dict(method=methods.SnapKV(window=4), compression_ratio=0.5)):
    alone = kvjax.generate(chat_model, prompt, max_new_tokens=3, **kwargs)
    empty = kvjax.generate(chat_model, prompt, questions="", max_new_tokens=3, **kwargs)
    assert empty.token_ids == alone.token_ids, kwargs
    assert empty.stats["question_tokens"] == [0]
    assert empty.stats["prompt_tokens"] == alone.stats["prompt_tokens"]
  # In a batch only the empty question's row goes without (a chat template renders it
  # into that row's context).
  alone = kvjax.generate(chat_model, prompt, max_new_tokens=3).token_ids[0]
  asked = kvjax.generate(chat_model, other, questions="Why?", max_new_tokens=3).token_ids[0]
  batch = kvjax.generate(chat_model, [prompt, other], questions=["", "Why?"], max_new_tokens=3)
  assert batch.token_ids == [alone, asked]
  # Without a template both rows of one prompt have the same context, prefilled once; the
  # row without a question continues from it as a call without questions does.
  plain = dict(chat_template=False, max_new_tokens=3)
  shared = kvjax.generate(chat_model, other, questions=["", " Why?"], **plain)
  assert shared.token_ids == [kvjax.generate(chat_model, other, **plain).token_ids[0],
                              kvjax.generate(chat_model, other, questions=" Why?",
                                             **plain).token_ids[0]]


def test_prompt_containing_a_separator_or_private_use_characters(chat_model):
  """The question is placed after the prompt in the rendered chat at a character the prompt
  does not contain, so no prompt text can break the split."""
  tokenizer = chat_model.tokenizer
  for prompt in ("a\x00kvjax-question\x00b", "uses \U000F0000 and \U000F0001 already"):
    batch = inputs.encode(chat_model, [prompt], ["Why?"], True)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True)
    end = rendered.index(prompt) + len(prompt)
    assert batch.prompts[0] == tokenizer.encode(rendered[:end], add_special_tokens=False)
    assert batch.questions[0] == tokenizer.encode("Why?" + rendered[end:],
                                                  add_special_tokens=False)
    result = kvjax.generate(chat_model, prompt, questions="Why?", max_new_tokens=2)
    assert result.stats["question_tokens"] == [len(batch.questions[0])]


def test_a_template_that_repeats_the_prompt_cannot_place_a_question(chat_model):
  tokenizer = copy.copy(chat_model.tokenizer)
  tokenizer.chat_template = "{{ messages[0]['content'] }}|{{ messages[0]['content'] }}"
  twice = types.SimpleNamespace(tokenizer=tokenizer, config=chat_model.config, name="twice")
  with pytest.raises(kvjax.GenerationError, match="renders the prompt 2 times"):
    inputs.encode(twice, ["hello"], ["Why?"], True)


# ------------------------------------------------------------------ converse


def test_converse_takes_one_question_string_as_one_turn(chat_model):
  context = "The code word is banana."
  one = kvjax.converse(chat_model, context, "What is the code word?", max_new_tokens=3)
  listed = kvjax.converse(chat_model, context, ["What is the code word?"], max_new_tokens=3)
  assert one.stats["turns"] == 1 and len(one.answers) == 1 and len(one.answers[0]) == 1
  assert one.answers == listed.answers


@pytest.mark.parametrize("contexts, questions, words", [
    (None, ["q?"], "contexts=None"),
    (5, ["q?"], "contexts=5"),
    ([], ["q?"], "contexts=[]"),
    (["a", 3], [["q?"], ["q?"]], "contexts="),
    (["a", "b"], ["q1?", "q2?"], "[[q] for q in questions]"),
    (["a", "b"], "q?", "one list per context"),
    ("a", None, "questions=None"),
    ("a", 5, "questions=5"),
    ("a", [["q?"]], "questions[0][0]"),
    ("a", ["q?", 3], "questions[0][1]"),
])
def test_converse_rejects_malformed_contexts_and_questions(chat_model, contexts, questions,
                                                           words):
  rejected(lambda: kvjax.converse(chat_model, contexts, questions, max_new_tokens=2), words)


def test_converse_rejects_bad_sampling_arguments_first(chat_model):
  rejected(lambda: kvjax.converse(chat_model, "a", "b?", max_new_tokens="2"),
           "max_new_tokens='2'")
  rejected(lambda: kvjax.converse(chat_model, "a", "b?", stop=7), "stop=7")
  rejected(lambda: kvjax.converse(chat_model, "a", "b?", chat_template="yes"),
           "chat_template='yes'")


# ------------------------------------------------------------------ method objects


def _method_class(name):
  return type(methods.get(name))  # every registered method builds with its defaults


FLOAT_FIELDS = [(name, f.name) for name in methods.available()
                for f in dataclasses.fields(_method_class(name)) if isinstance(f.default, float)]
BOOL_FIELDS = [(name, f.name) for name in methods.available()
               for f in dataclasses.fields(_method_class(name)) if isinstance(f.default, bool)]


def test_the_field_lists_cover_the_methods():
  assert len(FLOAT_FIELDS) >= 9 and ("pyramidkv", "beta") in FLOAT_FIELDS
  assert ("expected_attention", "epsilon") in FLOAT_FIELDS and ("adakv", "alpha_safeguard") \
      in FLOAT_FIELDS
  assert ("expected_attention", "use_vnorm") in BOOL_FIELDS


@pytest.mark.parametrize("name, field", FLOAT_FIELDS)
def test_non_finite_float_hyperparameters(name, field):
  cls = _method_class(name)
  for value in (math.nan, math.inf, -math.inf):
    with pytest.raises(MethodError, match=f"{field}={value}"):
      cls(**{field: value})
    with pytest.raises(MethodError, match=f"{field}={value}"):
      methods.get(f"{name}:{field}={value}")  # the command line's spelling


@pytest.mark.parametrize("name, field", BOOL_FIELDS)
def test_bool_hyperparameters_are_not_strings(name, field):
  with pytest.raises(MethodError, match=f"{field}='no' must be True or False"):
    _method_class(name)(**{field: "no"})


@pytest.mark.parametrize("weights", [("a", 1), "1,x", 3, (1.0, math.nan), (1.0, -1.0), (0, 0),
                                     [1.0, None], (True, 1.0)])
def test_malformed_per_layer_weights_name_the_field(weights):
  with pytest.raises(MethodError, match="per_layer weights="):
    methods.PerLayer(weights=weights)


def test_per_layer_weights_from_text_and_numbers():
  assert methods.PerLayer(weights="1, 2,3").weights == (1.0, 2.0, 3.0)
  assert methods.get("per_layer:weights=1,2").weights == (1.0, 2.0)
  assert methods.PerLayer(weights=np.array([1, 2])).weights == (1.0, 2.0)


def test_huge_integer_hyperparameters():
  with pytest.raises(MethodError, match=f"window={2**40}"):
    methods.SnapKV(window=2**40)
  with pytest.raises(MethodError, match="seed="):
    methods.ZipVL(seed=2**70)


ANY_VALUE = st.one_of(st.floats(), st.integers(), st.booleans(), st.text(max_size=6), st.none(),
                      st.lists(st.floats(), max_size=3),
                      st.sampled_from(["snapkv", "h2o", "kivi", "full", "max", "kvpress"]))


def _numbers(method):
  """Every number held by a method's fields, nested presses and tuples included."""
  for field in dataclasses.fields(method):
    value = getattr(method, field.name)
    if isinstance(value, methods.Method):
      yield from _numbers(value)
    elif isinstance(value, tuple):
      yield from value
    elif isinstance(value, (int, float)):
      yield value


@settings(PROPERTY, max_examples=200)  # no model: cheap
@given(name=st.sampled_from(methods.available()), data=st.data())
def test_property_method_constructors(name, data):
  """Any hyperparameter values: a kvjax error, or a hashable method whose numbers are all
  finite (never another exception)."""
  fields = [f.name for f in dataclasses.fields(_method_class(name))]
  kwargs = data.draw(st.dictionaries(st.sampled_from(fields), ANY_VALUE, max_size=3)) \
      if fields else {}
  try:
    method = _method_class(name)(**kwargs)
  except kvjax.KvjaxError:
    return
  hash(method)
  assert all(math.isfinite(x) for x in _numbers(method)), method


# ------------------------------------------------------------------ config files

HF_CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}


def _hf_directory(tmp_path, text: str):
  directory = tmp_path / "model"
  directory.mkdir()
  (directory / "config.json").write_text(text)
  return directory


def test_valid_hf_config_gets_past_the_config(tmp_path):
  directory = _hf_directory(tmp_path, json.dumps(HF_CONFIG))
  with pytest.raises(kvjax.CheckpointError, match="safetensors"):
    kvjax.load(directory)  # no weights: the config itself was fine


@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layers": 2.5}, ["num_hidden_layers=2.5", "integer"]),
    ({"num_hidden_layers": "2"}, ["num_hidden_layers='2'"]),
    ({"vocab_size": 256.0}, ["vocab_size=256.0"]),
    ({"num_key_value_heads": 1.5}, ["num_key_value_heads=1.5"]),
    ({"head_dim": "16"}, ["head_dim='16'"]),
    ({"rope_theta": "big"}, ["rope_theta='big'"]),
    ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps='1e-5'"]),
    ({"tie_word_embeddings": "false"}, ["tie_word_embeddings='false'", "True or False"]),
    ({"attention_bias": "no"}, ["attention_bias='no'"]),
    ({"sliding_window": "64", "use_sliding_window": True}, ["sliding_window='64'"]),
    ({"rope_scaling": "llama3"}, ["rope_scaling='llama3'"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1,
                       "high_freq_factor": 4, "original_max_position_embeddings": 8192}},
     ["rope_scaling.factor='8'"]),
])
def test_hf_config_fields_of_the_wrong_type(tmp_path, change, words):
  directory = _hf_directory(tmp_path, json.dumps({**HF_CONFIG, **change}))
  rejected(lambda: kvjax.load(directory), str(directory / "config.json"), *words)


@pytest.mark.parametrize("text, words", [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["JSON object"]),
])
def test_hf_config_that_is_not_a_json_object(tmp_path, text, words):
  directory = _hf_directory(tmp_path, text)
  rejected(lambda: kvjax.load(directory), str(directory / "config.json"), *words)


@pytest.fixture
def checkpoint(tmp_path, model):
  return orbax_io.save(model, tmp_path / "ckpt")


@pytest.mark.parametrize("change, words", [
    ({"num_layers": 2.5}, ["num_layers=2.5"]),
    ({"num_layers": "2"}, ["num_layers='2'"]),
    ({"rope_theta": "x"}, ["rope_theta='x'"]),
    ({"rms_norm_eps": math.inf}, ["rms_norm_eps=inf"]),
    ({"tie_embeddings": "no"}, ["tie_embeddings='no'"]),
    ({"rope_scaling": "x"}, ["rope_scaling='x'"]),
    ({"rope_scaling": {"factor": "x"}}, ["rope_scaling.factor='x'"]),
    ({"rope_scaling": {"scale": 2}}, ["rope_scaling="]),
    ({"name": 3}, ["name=3"]),
])
def test_kvjax_config_fields_of_the_wrong_type(checkpoint, change, words):
  path = checkpoint / orbax_io.CONFIG_FILE
  path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
  with pytest.raises(ConfigError) as error:
    kvjax.load(checkpoint)
  for word in [str(path)] + words:
    assert word in str(error.value)


def test_kvjax_config_that_is_not_json(checkpoint):
  path = checkpoint / orbax_io.CONFIG_FILE
  path.write_text(path.read_text()[:-5])
  with pytest.raises(ConfigError, match="not valid JSON") as error:
    kvjax.load(checkpoint)
  assert str(path) in str(error.value)


def test_model_config_from_dict_checks_its_input(model):
  with pytest.raises(ConfigError, match="JSON object"):
    ModelConfig.from_dict([1])
  good = json.loads(model.config.to_json())
  with pytest.raises(ConfigError, match=r"missing fields \['vocab_size'\]"):
    ModelConfig.from_dict({k: v for k, v in good.items() if k != "vocab_size"})
  assert ModelConfig.from_dict({**good, "num_layers": np.int64(2)}).to_json() == \
      ModelConfig.from_dict(good).to_json()  # numpy scalars are stored as Python ints
