"""The demo pipeline (the main job): the whole Apriel recipe on a tiny model, on CPU, in minutes.

    apriel-jax pipeline configs/pipelines/demo.py [--plan] [--config.run_dir=runs/demo]

The config lives in the package (``apriel_jax/stages/demo.py``) so that a bare ``apriel-jax pipeline``
runs it from any installation; see that module for the stages and data.
"""

from apriel_jax.stages.demo import get_config  # noqa: F401
