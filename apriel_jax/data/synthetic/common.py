"""Helpers shared by the synthetic task generators: the chat-sample format and difficulty maths."""

from __future__ import annotations

from PIL import Image

__all__ = ["chat_sample", "check_difficulty", "lerp"]


def lerp(easy: float, hard: float, difficulty: float) -> float:
    """Parameter value at ``difficulty`` in [0, 1], from its easiest to its hardest setting."""
    return easy + (hard - easy) * difficulty


def check_difficulty(d: float) -> float:
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {d}")
    return float(d)


def chat_sample(task: str, image: Image.Image, question: str, answer_text: str, answer, difficulty: float) -> dict:
    """One user turn (image, then question) and the assistant's answer, plus structured ground truth."""
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer_text},
        ],
        "task": task,
        "answer": answer,
        "difficulty": float(difficulty),
    }
