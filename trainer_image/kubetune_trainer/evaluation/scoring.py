"""Answer-quality metrics: each a pure function of predictions and references, on a 0..1 scale.

exactMatch and tokenF1 compare SQuAD-style normalized answers (lower case, punctuation and the articles a/an/the
removed, whitespace collapsed); rougeL is rouge-score's ROUGE-L F-measure; bleu and chrf are sacrebleu's corpus
BLEU and chrF (default settings) divided by 100. Every metric is averaged over examples except bleu and chrf,
which are corpus statistics.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Callable, Sequence

GENERATED_METRICS = ("exactMatch", "tokenF1", "rougeL", "bleu", "chrf")
LOSS_METRICS = ("evalLoss", "perplexity")
LOWER_IS_BETTER = frozenset(LOSS_METRICS)
PER_EXAMPLE = ("exactMatch", "tokenF1", "rougeL")

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalized answers (bag of tokens)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, no stemming)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score.rouge_scorer import RougeScorer

        _ROUGE = RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU / 100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score) / 100.0


def corpus_chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus chrF / 100."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score) / 100.0


EXAMPLE_SCORERS: dict[str, Callable[[str, str], float]] = {
    "exactMatch": exact_match, "tokenF1": token_f1, "rougeL": rouge_l,
}
CORPUS_SCORERS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "bleu": corpus_bleu, "chrf": corpus_chrf,
}


def example_scores(prediction: str, reference: str, metrics: Sequence[str]) -> dict[str, float]:
    """The per-example metrics among `metrics` for one answer."""
    return {m: EXAMPLE_SCORERS[m](prediction, reference) for m in metrics if m in EXAMPLE_SCORERS}


def score_generations(predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str]
                      ) -> dict[str, float]:
    """The generated-text metrics among `metrics` over a set (mean of per-example scores, or corpus statistics)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score: no examples")
    out: dict[str, float] = {}
    for m in metrics:
        if m in EXAMPLE_SCORERS:
            out[m] = sum(EXAMPLE_SCORERS[m](p, r) for p, r in zip(predictions, references)) / len(predictions)
        elif m in CORPUS_SCORERS:
            out[m] = CORPUS_SCORERS[m](predictions, references)
    return out


def loss_metrics(nll_sum: float, tokens: int) -> dict[str, float]:
    """evalLoss (mean negative log-likelihood per answer token) and perplexity (its exponential, capped)."""
    if tokens <= 0:
        raise ValueError("no answer tokens to compute a loss on")
    loss = nll_sum / tokens
    return {"evalLoss": loss, "perplexity": math.exp(min(loss, 80.0))}


def improvement(metric: str, base: float, tuned: float) -> float:
    """How much better tuned is than base: tuned - base, or base - tuned where lower is better."""
    return base - tuned if metric in LOWER_IS_BETTER else tuned - base
