"""Exceptions with PEFT's names (`peft.utils.error`), so that `except` clauses written for PEFT keep working."""


class PeftError(Exception):
    """Base class of the errors peft_fast raises under PEFT's names."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """No module of the model matched the adapter config's target_modules."""
