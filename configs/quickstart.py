"""The quickstart demo settings: ``apriel-jax demo --config configs/quickstart.py``.

Identical to the default that ``apriel-jax demo`` uses without ``--config``; kept as a file so the
settings are visible and can be copied as a starting point. Field meanings are documented in
``apriel_jax.demo.default_config``.
"""

from apriel_jax.demo import default_config


def get_config():
    return default_config()
