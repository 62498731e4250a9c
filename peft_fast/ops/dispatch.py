"""The one place that decides which backend (torch | triton | cuda) runs a LoRA op.

Each op is a name ("lora_linear", "lora_embedding", …). Backends register an implementation per op together with
a `supports(*args)` predicate; `call(op, *args)` picks one per call. PEFT_FAST_BACKEND=torch|triton|cuda forces a
backend for every op it implements (ops it does not implement at all still run on torch); "auto" (the default)
takes the first registered backend, in preference order, whose predicate accepts the call.

A predicate's reason is either a plain string (the backend would normally run this call but cannot: auto mode
warns once, naming it) or a `Skip` (the call is simply not for this backend, e.g. a CPU tensor for a GPU
kernel: auto mode moves on silently).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

BACKENDS = ("cuda", "triton", "torch")  # preference order for "auto"
ENV_VAR = "PEFT_FAST_BACKEND"


class Skip(str):
    """A refusal that is normal for the call (no warning in auto mode)."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    supports: Callable[..., Optional[str]]  # returns None when it can run the call, else the reason it cannot


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_warned: set[tuple[str, str, str]] = set()


def register(op: str, backend: str, supports: Optional[Callable[..., Optional[str]]] = None):
    """Decorator registering `fn` as `backend`'s implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, supports or (lambda *a, **k: None))
        return fn

    return deco


def forced_backend() -> Optional[str]:
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {BACKENDS + ('auto',)}")
    return value


def choose(op: str, *args, **kwargs) -> str:
    """Name of the backend that will run `op` for these arguments."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    forced = forced_backend()
    if forced is not None and forced in impls:
        reason = impls[forced].supports(*args, **kwargs)
        if reason is None:
            return forced
        _warn_once(op, forced, reason)
        return "torch"
    if forced is not None:
        return "torch"
    for backend in BACKENDS:
        impl = impls.get(backend)
        if impl is None:
            continue
        reason = impl.supports(*args, **kwargs)
        if reason is None:
            return backend
        if not isinstance(reason, Skip):
            _warn_once(op, backend, reason)
    return "torch"


def call(op: str, *args, **kwargs):
    return _REGISTRY[op][choose(op, *args, **kwargs)].fn(*args, **kwargs)


def available_backends(op: str) -> list[str]:
    return [b for b in BACKENDS if b in _REGISTRY.get(op, {})]


def _warn_once(op: str, backend: str, reason: str) -> None:
    key = (op, backend, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"peft_fast: {op} runs on torch instead of {backend}: {reason}")
