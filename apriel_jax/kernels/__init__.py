"""Attention kernels. Importing the package registers every implementation with ``attention.register``."""

from apriel_jax.kernels import attention, blocked_xla, cudnn, flash_gpu, flash_tpu, splash  # noqa: F401
