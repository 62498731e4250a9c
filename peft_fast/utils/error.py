"""Exceptions with PEFT's names, so that `except` clauses written for PEFT keep working."""


class NoMatchingPeftModuleError(ValueError):
    """No module of the model matched the adapter config's target_modules."""
