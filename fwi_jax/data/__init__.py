"""Data on host: competition-format I/O and validation (`io`), the reference k-fold split
(`split`), and the grain input pipeline (`pipeline`). CLI: ``python -m fwi_jax.data``."""

from fwi_jax.data.io import DataError, check_dataset, list_samples, read_sample, write_submission

__all__ = ["DataError", "check_dataset", "list_samples", "read_sample", "write_submission"]
