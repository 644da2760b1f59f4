"""Scoring model outputs on the held-out synthetic sets: counting, detection, matching, colour/shape names.

Parsers are lenient about phrasing (a thinking model writes "The answer is three." as often as
"3") but look only at the final answer: text after the last ``[BEGIN FINAL RESPONSE]`` marker
(Apriel's reasoning format) and, within that, after the last "answer:" / "answer is" cue when
there is one. Unparseable outputs score as wrong, never raise.

Answers may be the structured ``sample["answer"]`` dicts the task generators emit or the bare
values (int count, letter, box tuple / None).
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = [
    "box_iou",
    "choice_accuracy",
    "counting_accuracy",
    "detection_score",
    "final_answer_text",
    "label_accuracy",
    "parse_box",
    "parse_choice",
    "parse_count",
    "parse_label",
    "parse_presence",
]

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"no": 0, "none": 0})
_COUNT_RE = re.compile(r"\b(\d+|" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")\b", re.I)
_ANSWER_CUE = re.compile(r"\banswer\b\s*(?:is\b\s*)?[:\-]?", re.I)
_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX_BRACKETED = re.compile(r"[\(\[]\s*" + r"[\s,]+".join([_NUM] * 4) + r"\s*[\)\]]")
_BOX_COMMAS = re.compile(r"\s*,\s*".join([_NUM] * 4))


def final_answer_text(text: str) -> str:
    """The part of a model output that holds its answer (see module docstring)."""
    text = text or ""
    if "[BEGIN FINAL RESPONSE]" in text:
        text = text.rsplit("[BEGIN FINAL RESPONSE]", 1)[1]
    text = text.replace("[END FINAL RESPONSE]", "").replace("<|end|>", "")
    cues = list(_ANSWER_CUE.finditer(text))
    if cues and text[cues[-1].end():].strip():
        text = text[cues[-1].end():]
    return text.strip()


# ---------------------------------------------------------------- counting


def parse_count(text: str) -> int | None:
    """First number in the answer: digits, or a word from "zero" to "twenty" ("no"/"none" = 0)."""
    m = _COUNT_RE.search(final_answer_text(text))
    if m is None:
        return None
    token = m.group(1).lower()
    return int(token) if token.isdigit() else _NUMBER_WORDS[token]


def _as_count(answer) -> int:
    return int(answer["count"]) if isinstance(answer, dict) else int(answer)


def _check_lengths(predictions: Sequence, answers: Sequence) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")


def counting_accuracy(predictions: Sequence[str], answers: Sequence) -> float:
    """Fraction of outputs whose parsed count equals the true count (0.0 for no samples)."""
    _check_lengths(predictions, answers)
    if not answers:
        return 0.0
    return sum(parse_count(p) == _as_count(a) for p, a in zip(predictions, answers)) / len(answers)


# ---------------------------------------------------------------- detection


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """First (x0, y0, x1, y1) in the answer: 4 numbers in ()/[] (comma or space separated) or
    4 comma-separated numbers. Corners are put in order (x0 <= x1, y0 <= y1)."""
    text = final_answer_text(text)
    m = _BOX_BRACKETED.search(text) or _BOX_COMMAS.search(text)
    if m is None:
        return None
    x0, y0, x1, y1 = (float(g) for g in m.groups())
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def parse_presence(text: str) -> bool | None:
    """Did the output say the object is there? A leading yes/no decides; otherwise a negation
    means no and a box means yes; None when it cannot tell."""
    answer = final_answer_text(text).lower()
    lead = re.match(r"\W*(yes|no)\b", answer)
    if lead:
        return lead.group(1) == "yes"
    if re.search(r"\b(there (is|are) no|not present|no such|does not|doesn't|cannot see|can't see)\b", answer):
        return False
    if parse_box(answer) is not None or re.search(r"\byes\b", answer):
        return True
    return None


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0.0 when either is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _as_detection(answer) -> tuple[bool, tuple | None]:
    if isinstance(answer, dict):
        return bool(answer["present"]), answer.get("box")
    return answer is not None, answer


def detection_score(predictions: Sequence[str], answers: Sequence) -> dict[str, float]:
    """Presence accuracy over all samples; mean IoU and recall@IoU>=0.5 over the samples whose
    object is present (a "no" or a missing box scores IoU 0). Boxes in the 0-1000 convention."""
    _check_lengths(predictions, answers)
    correct, ious = 0, []
    for pred, ans in zip(predictions, answers):
        present, box = _as_detection(ans)
        said = parse_presence(pred)
        correct += said == present
        if present:
            pred_box = parse_box(pred) if said is not False else None
            ious.append(box_iou(pred_box, box) if pred_box is not None else 0.0)
    n = len(answers)
    return {
        "presence_accuracy": correct / n if n else 0.0,
        "mean_iou": sum(ious) / len(ious) if ious else 0.0,
        "recall_at_0.5": sum(i >= 0.5 for i in ious) / len(ious) if ious else 0.0,
        "n": n,
        "n_present": len(ious),
    }


# ---------------------------------------------------------------- matching


def parse_choice(text: str, letters: str = "ABCDEFGH") -> str | None:
    """The chosen letter: "Answer: B", "(B)", "b", "**B**", "B. because ...", "option B".
    A lone lowercase letter counts only where it cannot be the article "a" in a sentence."""
    letters = letters.upper()
    answer = final_answer_text(text)

    def ok(letter: str) -> str | None:
        return letter.upper() if letter.upper() in letters else None

    patterns = (
        r"^\W*([A-Za-z])\W*$",  # the whole answer is one letter
        r"\(([A-Za-z])\)",  # (B)
        r"^\W*([A-Z])[\.\):]",  # B. / B) / B:
        r"\b(?:option|candidate|choice|letter)\s+\(?([A-Za-z])\b",
    )
    for pattern in patterns:
        m = re.search(pattern, answer)
        if m and ok(m.group(1)):
            return ok(m.group(1))
    # last resort: one distinct standalone capital letter in the answer ("I" is a pronoun)
    capitals = {c for c in re.findall(r"\b([A-Z])\b", answer) if c in letters and c != "I"}
    return capitals.pop() if len(capitals) == 1 else None


def choice_accuracy(predictions: Sequence[str], answers: Sequence, letters: str = "ABCDEFGH") -> float:
    """Fraction of outputs whose parsed letter is the right one (0.0 for no samples)."""
    _check_lengths(predictions, answers)
    if not answers:
        return 0.0
    truth = [(a["letter"] if isinstance(a, dict) else a).upper() for a in answers]
    return sum(parse_choice(p, letters) == t for p, t in zip(predictions, truth)) / len(answers)


# ---------------------------------------------------------------- identification (colour, shape)


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The first of ``labels`` named in the answer as a whole word, case-insensitive ("A red one." -> "red")."""
    found = re.search(r"\b(" + "|".join(re.escape(l) for l in labels) + r")s?\b", final_answer_text(text), re.I)
    return found.group(1).lower() if found else None


def label_accuracy(predictions: Sequence[str], answers: Sequence[str], labels: Sequence[str]) -> float:
    """Fraction of outputs whose parsed label is the true one (0.0 for no samples)."""
    _check_lengths(predictions, answers)
    if not answers:
        return 0.0
    return sum(parse_label(p, labels) == a for p, a in zip(predictions, answers)) / len(answers)
