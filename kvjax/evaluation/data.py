"""RULER's source texts: Paul Graham essays (haystacks), SQuAD v2 and HotpotQA (QA tasks).

The files come from the pinned "ruler-data" asset (kvjax.loading.assets), fetched once and
cached; each reader here parses its file once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re

# A sentence ends at . ! or ? (optionally closed by a quote or bracket) before a space and a
# capital, or right before a capital: the essays file lost the space between paragraphs
# ("low.Next").
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?(?= [\"']?[A-Z])|(?<=[a-z]{2}[.!?])(?=[A-Z])")
# Plain lowercase words, not parts of hyphenated or quoted compounds.
_PLAIN_WORD = re.compile(r"(?<![\w'-])[a-z]{4,10}(?![\w'-])")


@dataclasses.dataclass(frozen=True)
class QAItem:
  """One answerable question with the paragraph(s) that answer it.

  Attributes:
    question: the question text.
    answers: every accepted answer; each occurs verbatim in `documents`.
    documents: the gold paragraph(s), as they are shown to the model.
  """
  question: str
  answers: tuple[str, ...]
  documents: tuple[str, ...]


def _ruler_file(name: str) -> pathlib.Path:
  from kvjax.loading import assets  # lazy: importing the evaluation package stays cheap
  return assets.fetch("ruler-data") / name


def _read_json(name: str):
  with open(_ruler_file(name), encoding="utf-8") as f:
    return json.load(f)


@functools.cache
def essays_text() -> str:
  """The essays as one string, whitespace runs collapsed to single spaces."""
  return re.sub(r"\s+", " ", _read_json("PaulGrahamEssays.json")["text"]).strip()


def sentences(text: str) -> list[str]:
  """Splits text into sentences (each keeps its closing punctuation and quote)."""
  ends = [m.end() for m in _SENTENCE_END.finditer(text)]
  bounds = [0] + ends + [len(text)]
  parts = (text[a:b].strip() for a, b in zip(bounds, bounds[1:]))
  return [p for p in parts if p]


@functools.cache
def essay_vocabulary() -> tuple[str, ...]:
  """Distinct plain lowercase words (4 to 10 letters) of the essays, sorted.

  The word pool of common-words extraction (RULER draws from an English word list).
  """
  return tuple(sorted(set(_PLAIN_WORD.findall(essays_text()))))


@functools.cache
def squad() -> tuple[QAItem, ...]:
  """SQuAD v2 dev questions that have an answer, in file order."""
  items = []
  for article in _read_json("squad.json")["data"]:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        if qa.get("is_impossible"):
          continue
        item = _qa_item(qa["question"], [a["text"] for a in qa["answers"]],
                        [paragraph["context"]])
        if item is not None:
          items.append(item)
  return tuple(items)


@functools.cache
def hotpotqa() -> tuple[QAItem, ...]:
  """HotpotQA questions with their supporting paragraphs ("Title\\nText") as documents.

  Questions whose answer is not written in the supporting paragraphs (yes/no comparisons,
  reworded answers) are left out: substring scoring needs the answer in the context.
  """
  items = []
  for record in _read_json("hotpotqa.json"):
    if record["answer"].strip().lower() in ("yes", "no"):  # "no" is in every "not"
      continue
    supporting = {title for title, _ in record["supporting_facts"]}
    gold = [f"{title}\n{''.join(lines)}" for title, lines in record["context"]
            if title in supporting]
    item = _qa_item(record["question"], [record["answer"]], gold)
    if item is not None:
      items.append(item)
  return tuple(items)


def _qa_item(question: str, answers, documents) -> QAItem | None:
  """A QAItem of the answers found verbatim in the documents, or None if there are none."""
  documents = tuple(dict.fromkeys(d.strip() for d in documents if d.strip()))
  answers = tuple(dict.fromkeys(
      a.strip() for a in answers if a.strip() and any(a.strip() in d for d in documents)))
  if not answers or not question.strip():
    return None
  return QAItem(question=question.strip(), answers=answers, documents=documents)
