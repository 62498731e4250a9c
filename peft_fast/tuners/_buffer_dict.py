"""BufferDict: a dict of tensors registered as buffers of a module (PEFT's `peft.tuners._buffer_dict`).

Buffers follow `.to()` / `.cuda()` like parameters but are never trained; `persistent=False` (the default, as in
PEFT) keeps them out of state_dict, so that adapter files hold only what is trained."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Optional

import torch
from torch import nn


class BufferDict(nn.Module):
    def __init__(self, buffers: Optional[Mapping[str, torch.Tensor]] = None, persistent: bool = False):
        super().__init__()
        self.persistent = persistent
        if buffers is not None:
            self.update(buffers)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        self.register_buffer(key, buffer, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def keys(self):
        return self._buffers.keys()

    def items(self):
        return self._buffers.items()

    def values(self):
        return self._buffers.values()

    def update(self, buffers: Mapping[str, torch.Tensor]) -> None:
        for key, value in buffers.items():
            self[key] = value

    def extra_repr(self) -> str:
        return "\n".join(f"({k}): Buffer of shape {tuple(v.shape)} ({v.dtype}, {v.device})" for k, v in self.items())
