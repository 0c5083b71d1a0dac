"""Advice before spending: rules of thumb from fine-tuning guides, checked against the preflight's numbers.

Each rule that fires gives a Warning Event with the numbers and a line in the `Advice` condition (True when any
fired). Advice never blocks: the trainer Job is created either way. Thresholds (docs/preflight.md says where
each comes from):

| rule | fires when |
|---|---|
| FewExamples | fewer than MIN_EXAMPLES (200) training examples |
| SeqLengthAboveData | maxSeqLength >= SEQ_SLACK_FACTOR (2) x the longest example and >= SEQ_SLACK_TOKENS (256) tokens longer |
| Truncation | more than TRUNCATION_FRACTION (5%) of the examples are longer than maxSeqLength |
| LoraRankHigh | LoRA rank >= HIGH_RANK (64) with fewer than HIGH_RANK_MIN_EXAMPLES (1,000) training examples |
| LearningRateUnusual | learning rate outside LR_RANGES for the method (LoRA/QLoRA 1e-5..1e-3, full 1e-6..1e-4) |
| NearDuplicates | more than NEAR_DUPLICATE_FRACTION (10%) of the examples repeat another's words |
| ManyEpochs | more than MAX_EPOCHS_SMALL_DATA (3) epochs over fewer than MANY_EPOCHS_MIN_EXAMPLES (1,000) examples |
| ChatTemplateFamily | dataset.chatTemplate names a family template (TEMPLATE_FAMILIES) the model is not of |
"""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJobSpec

MIN_EXAMPLES = 200
SEQ_SLACK_FACTOR = 2.0
SEQ_SLACK_TOKENS = 256
TRUNCATION_FRACTION = 0.05
HIGH_RANK = 64
HIGH_RANK_MIN_EXAMPLES = 1000
LR_RANGES = {"lora": (1e-5, 1e-3), "qlora": (1e-5, 1e-3), "full": (1e-6, 1e-4)}
NEAR_DUPLICATE_FRACTION = 0.10
MAX_EPOCHS_SMALL_DATA = 3
MANY_EPOCHS_MIN_EXAMPLES = 1000
# Named chat templates made for one model family (config.json model_type); chatml and alpaca are generic.
TEMPLATE_FAMILIES = {"llama3": ("llama",), "mistral": ("mistral", "mixtral"), "gemma": ("gemma", "gemma2", "gemma3"),
                     "phi3": ("phi3",)}

FEW_EXAMPLES = "FewExamples"
SEQ_ABOVE_DATA = "SeqLengthAboveData"
TRUNCATION = "Truncation"
LORA_RANK_HIGH = "LoraRankHigh"
LEARNING_RATE_UNUSUAL = "LearningRateUnusual"
NEAR_DUPLICATES = "NearDuplicates"
MANY_EPOCHS = "ManyEpochs"
CHAT_TEMPLATE_FAMILY = "ChatTemplateFamily"
RULES = (FEW_EXAMPLES, SEQ_ABOVE_DATA, TRUNCATION, LORA_RANK_HIGH, LEARNING_RATE_UNUSUAL, NEAR_DUPLICATES,
         MANY_EPOCHS, CHAT_TEMPLATE_FAMILY)


def advise(spec: FineTuneJobSpec, preflight: dict[str, Any]) -> list[tuple[str, str]]:
    """(rule, message with the numbers) for every rule the job trips; empty when none."""
    out: list[tuple[str, str]] = []
    examples = int(preflight.get("examples") or 0)
    train = int(preflight.get("trainExamples") or 0)
    longest = int((preflight.get("tokenLengths") or {}).get("max") or 0)
    p95 = int((preflight.get("tokenLengths") or {}).get("p95") or 0)
    max_len = spec.training.max_seq_length
    if train < MIN_EXAMPLES:
        out.append((FEW_EXAMPLES, f"{train} training examples (fewer than about {MIN_EXAMPLES}): the model may "
                                  f"memorise them rather than learn the task; add examples or train fewer epochs"))
    if longest and max_len >= SEQ_SLACK_FACTOR * longest and max_len - longest >= SEQ_SLACK_TOKENS:
        out.append((SEQ_ABOVE_DATA, f"training.maxSeqLength {max_len} but the longest example has {longest} tokens "
                                    f"(p95 {p95}): the sizer reserves GPU memory for {max_len}; "
                                    f"maxSeqLength {longest} would size for the data"))
    truncated = int(preflight.get("truncated") or 0)
    if examples and truncated > TRUNCATION_FRACTION * examples:
        where = ", ".join(preflight.get("truncatedLocations") or [])
        out.append((TRUNCATION, f"{truncated} of {examples} examples ({truncated / examples:.0%}) are longer than "
                                f"training.maxSeqLength {max_len} (longest {longest} tokens, p95 {p95}) and are cut"
                                + (f" (first at {where})" if where else "")))
    lora = spec.effective_lora()
    if lora is not None and lora.r >= HIGH_RANK and train < HIGH_RANK_MIN_EXAMPLES:
        out.append((LORA_RANK_HIGH, f"LoRA rank {lora.r} for {train} training examples (rank >= {HIGH_RANK} with "
                                    f"fewer than {HIGH_RANK_MIN_EXAMPLES:,}): a lower rank (8-32) fits this much "
                                    f"data with less overfitting"))
    low, high = LR_RANGES[spec.method]
    lr = float(spec.training.learning_rate)
    if not low <= lr <= high:
        out.append((LEARNING_RATE_UNUSUAL, f"learning rate {lr:g} is outside the usual {low:g}..{high:g} for "
                                           f"{spec.method} fine-tuning"))
    near = int(preflight.get("nearDuplicates") or 0)
    if examples and near > NEAR_DUPLICATE_FRACTION * examples:
        out.append((NEAR_DUPLICATES, f"{near} of {examples} examples ({near / examples:.0%}) repeat another "
                                     f"example's words (exact duplicates: {int(preflight.get('duplicates') or 0)}): "
                                     f"they weigh those examples up; deduplicate the dataset"))
    epochs = spec.training.epochs
    if epochs > MAX_EPOCHS_SMALL_DATA and train < MANY_EPOCHS_MIN_EXAMPLES:
        out.append((MANY_EPOCHS, f"{epochs:g} epochs over {train} training examples (more than "
                                 f"{MAX_EPOCHS_SMALL_DATA} with fewer than {MANY_EPOCHS_MIN_EXAMPLES:,}): small datasets "
                                 f"overfit after 1-3 passes; train fewer epochs or evaluate with early stopping"))
    template = spec.dataset.chat_template
    model_type = str(preflight.get("modelType") or "")
    families = TEMPLATE_FAMILIES.get(template)
    if families and model_type and model_type not in families:
        out.append((CHAT_TEMPLATE_FAMILY, f"dataset.chatTemplate {template} is made for {'/'.join(families)} models "
                                          f"but the model is {model_type}: its special tokens are not the ones this "
                                          f"model was trained with; use the tokenizer's own template (leave "
                                          f"chatTemplate empty) or chatml"))
    return out
