"""How one generated answer is scored against its reference(s), in percent: each task names its metric.

- ``exact_match``: the papers' normalised exact match (lower-cased, punctuation stripped, whitespace collapsed)
  against any of the references.
- ``rouge_l``: ROUGE-L F1 (Porter stemming, via ``rouge-score``), the best over the references (SuperNI's
  generation tasks, TRACE's MeetingBank).
- ``choice``: the option letter: the first character of the answer (TRACE's C-STANCE, FOMC, ScienceQA, whose
  references are a letter, possibly followed by the reasons).
- ``number``: the first number in the answer equals the reference's (TRACE's NumGLUE).
- ``edit_similarity``: the normalised Indel similarity of the two strings (``rapidfuzz.fuzz.ratio``), TRACE's
  metric for code completion (Py150).
- ``sari``: SARI (Xu et al., 2016) of the answer given the input it simplifies and the references (TRACE's
  20Minuten).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

from .data import Example

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace (the papers' exact-match normalisation)."""
    return " ".join(_PUNCTUATION.sub("", text.lower()).split())


def exact_match(prediction: str, example: Example) -> float:
    return 100.0 * any(normalize_answer(prediction) == normalize_answer(r) for r in example.all_outputs)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, example: Example) -> float:
    return 100.0 * max(_rouge_scorer().score(r, prediction)["rougeL"].fmeasure for r in example.all_outputs)


def choice(prediction: str, example: Example) -> float:
    answer, reference = prediction.strip(), example.output.strip()
    return 100.0 * bool(answer and reference and answer[0].upper() == reference[0].upper())


def number(prediction: str, example: Example) -> float:
    found, expected = _NUMBER.search(prediction), _NUMBER.search(example.output)
    return 100.0 * bool(found and expected and float(found.group()) == float(expected.group()))


def edit_similarity(prediction: str, example: Example) -> float:
    from rapidfuzz import fuzz

    return max(fuzz.ratio(prediction.strip(), r.strip()) for r in example.all_outputs)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _sari_ngram(source: Counter, candidate: Counter, references: list[Counter]) -> tuple[float, float, float]:
    """SARI's keep F1, deletion precision and addition F1 for one n-gram order. Counts of the source and the
    candidate are weighted by the number of references, so that one reference's n-gram counts 1/k; 0/0 is 1
    (an answer that matches a reference exactly scores full marks)."""
    k = len(references)
    reference = sum(references, Counter())
    source_k = Counter({g: c * k for g, c in source.items()})
    candidate_k = Counter({g: c * k for g, c in candidate.items()})

    kept = source_k & candidate_k
    kept_good, keepable = kept & reference, source_k & reference
    keep_precision = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_recall = sum(kept_good.values()) / sum(keepable.values()) if keepable else 1.0

    deleted = source_k - candidate_k
    deleted_good = deleted - reference
    # deletions are scored by precision only (recall would reward deleting everything)
    delete_precision = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(candidate) - set(source)
    addable = set(reference) - set(source)
    add_precision = len(added & addable) / len(added) if added else 1.0
    add_recall = len(added & addable) / len(addable) if addable else 1.0
    return _f1(keep_precision, keep_recall), delete_precision, _f1(add_precision, add_recall)


def sari(prediction: str, example: Example) -> float:
    """SARI = mean of (keep F1, deletion precision, addition F1), each averaged over n-grams n = 1..4."""
    tokens = [_TOKEN.findall(text.lower()) for text in (example.input, prediction, *example.all_outputs)]
    parts = [_sari_ngram(_ngrams(tokens[0], n), _ngrams(tokens[1], n), [_ngrams(t, n) for t in tokens[2:]])
             for n in range(1, 5)]
    return 100.0 * sum(sum(part[i] for part in parts) / 4 for i in range(3)) / 3


ANSWER_METRICS = {"exact_match": exact_match, "rouge_l": rouge_l, "choice": choice, "number": number,
                  "edit_similarity": edit_similarity, "sari": sari}
