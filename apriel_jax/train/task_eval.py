"""Task metrics during training: held-out synthetic visual questions answered by greedy generation.

For each task in ``eval.tasks`` (counting, color, shape) the questions come from an index range of the
synthetic task generator that training never draws (``HELD_OUT_START`` onwards), with the image size and
difficulty of the run's synthetic training source. Each task reports three numbers:

* ``<task>_accuracy``: the model's answers on the real images;
* ``<task>_majority_baseline``: always giving the most frequent true answer, the best a model can do from
  the question alone;
* ``<task>_blind_accuracy``: the model's answers to the same questions with every image replaced by a blank
  grey one of the same size. A model that reads its answers off the image falls to about the baseline
  here; one that only learned the answer prior scores the same with and without the image.

Every prompt is rendered with the run's chat format and tokenizer and all are answered in one batched
``generate`` call whose shapes are fixed by the questions (the longest one and its image's patches), so the
metric compiles once per run and never touches the train step's executable.
"""

from __future__ import annotations

from collections import Counter
from functools import partial

import numpy as np
from flax import nnx
from PIL import Image

from apriel_jax.data.chat import ChatFormat, parse_response
from apriel_jax.data.images import ImageConfig
from apriel_jax.data.prompt import prompt_batch
from apriel_jax.data.records import resolve_tokenizer_path
from apriel_jax.data.synthetic import CATEGORIES, COLORS, TaskMixture
from apriel_jax.data.synthetic.metrics import counting_accuracy, label_accuracy
from apriel_jax.data.tokenizer import load_tokenizer
from apriel_jax.model.generate import SamplingConfig, generate
from apriel_jax.train.inputs import synthetic_image_size

HELD_OUT_START = 10**9  # training reads synthetic samples from index 0 upwards
BLANK = (128, 128, 128)  # the blind control's image: mid-grey, inside the scenes' background range

# task -> (key of the true answer in the generator's structured answer, accuracy of a model's answers)
SCORED_TASKS = {
    "counting": ("count", counting_accuracy),
    "color": ("color", partial(label_accuracy, labels=tuple(COLORS))),
    "shape": ("category", partial(label_accuracy, labels=CATEGORIES)),
}


def majority_baseline(answers: list) -> float:
    """Accuracy of always giving the most frequent answer."""
    return Counter(answers).most_common(1)[0][1] / len(answers) if answers else 0.0


class TaskEval:
    def __init__(self, cfg, tasks, num_samples: int, max_new_tokens: int = 12):
        unknown = sorted(set(tasks) - set(SCORED_TASKS))
        if unknown:
            raise ValueError(f"eval.tasks {unknown} cannot be scored; known: {sorted(SCORED_TASKS)}")
        self.tasks, self.num_samples = tuple(tasks), num_samples
        self.tokenizer = load_tokenizer(resolve_tokenizer_path(cfg.data.tokenizer))
        self.chat = ChatFormat(mode=cfg.data.chat_format, image_cfg=ImageConfig(longest_edge=cfg.model.vision.image_size))
        # Same image size (and so the same patch count) and difficulty as the synthetic tasks the run trains on.
        synthetic = [s for s in cfg.data.sources if s["kind"] == "synthetic"]
        spec = synthetic[0] if synthetic else {}
        size = synthetic_image_size(spec)
        difficulty = (spec.get("options") or {}).get("difficulty", 0.5)
        self.answers, prompts = {}, []
        for task in self.tasks:
            samples = TaskMixture(weights={task: 1.0}, difficulty=difficulty, seed=cfg.eval.seed,
                                  start=HELD_OUT_START, length=num_samples, size=(size, size))
            key = SCORED_TASKS[task][0]
            questions = [samples[i] for i in range(num_samples)]
            self.answers[task] = [q["answer"][key] for q in questions]
            for blind in (False, True):
                prompts += [self._prompt(q["messages"], blind) for q in questions]
        # As long as the longest question and as many patches as its image has, not the training row's
        # seq_len and patch_budget: the prompts are ~1/10 of a row, and the vision tower and the prefill
        # would otherwise run mostly on padding.
        self.batch = prompt_batch(prompts, pad_id=self.tokenizer.pad_id, image_id=self.tokenizer.image_id)
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_tokens=(self.tokenizer.eos_id,),
                                       pad_id=self.tokenizer.pad_id)

    def _prompt(self, messages: list[dict], blind: bool):
        question = [m for m in messages if m["role"] != "assistant"]
        if blind:
            question = [{**m, "content": [_blank(part) for part in m["content"]]} for m in question]
        doc = self.chat.encode(question, self.tokenizer, add_generation_prompt=True)
        return doc.tokens.tolist(), doc.images

    def __call__(self, graphdef, params, frozen) -> dict:
        model = nnx.merge(graphdef, params, frozen)
        tokens, _ = generate(model, self.batch, self.sampling)
        texts = [self.tokenizer.decode(row) for row in np.asarray(tokens).tolist()]
        outputs = iter(parse_response(text).answer for text in texts)
        scores = {}
        for task in self.tasks:
            accuracy, truth = SCORED_TASKS[task][1], self.answers[task]
            for metric in ("accuracy", "blind_accuracy"):  # the order the prompts were built in
                scores[f"{task}_{metric}"] = accuracy([next(outputs) for _ in truth], truth)
            scores[f"{task}_majority_baseline"] = majority_baseline(truth)
        return scores


def _blank(part: dict) -> dict:
    if part.get("type") != "image":
        return part
    return {**part, "image": Image.new("RGB", part["image"].size, BLANK)}


def task_summary(entries: list[dict]) -> dict[str, dict]:
    """Per scored task of a run's metrics log (the rows of metrics.jsonl): held-out accuracy at the first
    and last evaluation, and the majority baseline and blind-control accuracy at the last one."""
    evals = [e for e in entries if e.get("split") == "eval"]
    suffix = "_majority_baseline"
    tasks = sorted({k.removesuffix(suffix) for e in evals for k in e if k.endswith(suffix)})

    def values(key: str) -> list:
        return [e[key] for e in evals if e.get(key) is not None]

    return {task: dict(accuracy_start=values(f"{task}_accuracy")[0], accuracy_end=values(f"{task}_accuracy")[-1],
                       majority_baseline=values(f"{task}_majority_baseline")[-1],
                       blind_accuracy=values(f"{task}_blind_accuracy")[-1])
            for task in tasks}
