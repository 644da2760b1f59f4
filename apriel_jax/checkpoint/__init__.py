"""Checkpoint I/O: Hugging Face and Mistral import/export, orbax model directories."""
