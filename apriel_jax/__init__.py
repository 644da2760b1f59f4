"""apriel-jax: the Apriel-1.5 training recipe (Pixtral encoder + projector + Mistral-NeMo decoder) in JAX."""

import os as _os

__version__ = "0.1.0"

# gcsfs reads this once, when it is imported, and whoever imports it first (tensorflow-datasets, a user's
# script) decides: set it before anything can. See apriel_jax.storage.gcs.configure_environment.
_os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def from_pretrained(path, **kwargs):
    """Load a model from an HF, Mistral consolidated or apriel-jax checkpoint directory.

    See ``apriel_jax.checkpoint.pretrained.from_pretrained`` for the arguments.
    """
    from apriel_jax.checkpoint.pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
