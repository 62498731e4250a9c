"""Warnings with PEFT's names (`peft.utils.warning`)."""


class PeftWarning(UserWarning):
    """Base class of the warnings PEFT users filter by."""
