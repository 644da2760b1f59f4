"""Task metrics during training: held-out synthetic counting questions answered by greedy generation.

The questions come from an index range of the synthetic task mixture that training never draws
(``HELD_OUT_START`` onwards), are rendered with the run's chat format and tokenizer, and are answered in
one batched ``generate`` call with static shapes (the run's sequence length and patch budget), so the
metric compiles once and never touches the train step's executable.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from apriel_jax.data.chat import ChatFormat, parse_response
from apriel_jax.data.images import ImageConfig
from apriel_jax.data.prompt import prompt_batch
from apriel_jax.data.records import resolve_tokenizer_path
from apriel_jax.data.synthetic import TaskMixture
from apriel_jax.data.synthetic.metrics import counting_accuracy
from apriel_jax.data.tokenizer import load_tokenizer
from apriel_jax.model.generate import SamplingConfig, generate
from apriel_jax.train.inputs import synthetic_image_size

HELD_OUT_START = 10**9  # training reads synthetic samples from index 0 upwards


class CountingEval:
    def __init__(self, cfg, num_samples: int, max_new_tokens: int = 24):
        self.tokenizer = load_tokenizer(resolve_tokenizer_path(cfg.data.tokenizer))
        self.chat = ChatFormat(mode=cfg.data.chat_format, image_cfg=ImageConfig(longest_edge=cfg.model.vision.image_size))
        # Same image size (and so the same patch count) as the synthetic tasks the run trains on.
        synthetic = [s for s in cfg.data.sources if s["kind"] == "synthetic"]
        size = synthetic_image_size(synthetic[0] if synthetic else {})
        samples = TaskMixture(weights={"counting": 1.0}, seed=cfg.eval.seed, start=HELD_OUT_START,
                              length=num_samples, size=(size, size))
        self.answers = [samples[i]["answer"] for i in range(num_samples)]
        # Accuracy of always answering the most frequent count: the bar a model that ignores the image
        # reaches (most questions ask about one colour or category, so "1" is common).
        counts = [a["count"] for a in self.answers]
        self.majority_baseline = max(counts.count(c) for c in set(counts)) / max(1, len(counts))
        prompts = []
        for i in range(num_samples):
            question = [m for m in samples[i]["messages"] if m["role"] != "assistant"]
            doc = self.chat.encode(question, self.tokenizer, add_generation_prompt=True)
            prompts.append((doc.tokens.tolist(), [(im.patches, im.positions) for im in doc.images]))
        self.batch = prompt_batch(prompts, seq_len=cfg.data.seq_len, patch_budget=cfg.data.patch_budget,
                                  pad_id=self.tokenizer.pad_id, image_id=self.tokenizer.image_id)
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_tokens=(self.tokenizer.eos_id,),
                                       pad_id=self.tokenizer.pad_id)

    def __call__(self, graphdef, params, frozen) -> dict:
        model = nnx.merge(graphdef, params, frozen)
        tokens, _ = generate(model, self.batch, self.sampling)
        texts = [self.tokenizer.decode(row) for row in np.asarray(tokens).tolist()]
        answers = [parse_response(text).answer for text in texts]
        return {"counting_accuracy": counting_accuracy(answers, self.answers),
                "counting_majority_baseline": self.majority_baseline}
