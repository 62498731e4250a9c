"""Triton kernels of peft_fast (importable as `peft_fast.kernels`).

One kernel family a file, its launcher beside it; each registers itself with `peft_fast.ops.dispatch` for the ops it
implements. Importing this package needs Triton; `available()` says whether Triton kernels can run here.
"""


def available() -> bool:
    """True when Triton is importable and has a driver (a GPU, or TRITON_INTERPRET=1 on the CPU)."""
    try:
        import triton  # noqa: F401
        from triton.runtime import driver

        driver.active.get_current_target()
        return True
    except Exception:
        return False
