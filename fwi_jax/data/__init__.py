"""Data on host: competition-format I/O and validation (`io`), the reference k-fold split
(`split`), packed memory-mapped stores (`pack`), and the grain input pipeline (`pipeline`, over
folders or a packed store). CLI: ``python -m fwi_jax.data {check,split,pack}``."""

from fwi_jax.data.io import DataError, check_dataset, list_samples, read_sample, write_submission

__all__ = ["DataError", "check_dataset", "list_samples", "read_sample", "write_submission"]
