"""apriel-jax: the Apriel-1.5 training recipe (Pixtral encoder + projector + Mistral-NeMo decoder) in JAX."""

__version__ = "0.1.0"


def from_pretrained(path, **kwargs):
    """Load a model from an HF, Mistral consolidated or apriel-jax checkpoint directory.

    See ``apriel_jax.checkpoint.pretrained.from_pretrained`` for the arguments.
    """
    from apriel_jax.checkpoint.pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
