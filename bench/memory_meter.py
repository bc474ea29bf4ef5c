"""Peak bytes of tensor storage allocated by torch ops inside a block, on any device (CPU too).

Every op's outputs are seen through a `TorchDispatchMode`; a storage counts from the first op
that returns it until the last tensor seen on it is garbage-collected. Storages that existed
before the block (its inputs) are not counted. Used by the tests and the benchmarks to check
that the compressor's extra memory stays linear; on CUDA, `torch.cuda.max_memory_allocated`
measures the same thing faster.

    with PeakMemory() as meter:
        mig_compress(states, query, 16)
    print(meter.peak)  # bytes
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory"]


class PeakMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]
        self.external: set[int] = set()  # storages that existed before the block (inputs)
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        for tensor in inputs:
            key = tensor.untyped_storage().data_ptr()
            if key not in self.live:
                self.external.add(key)
        out = func(*args, **(kwargs or {}))
        input_ids = {id(t) for t in inputs}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or id(tensor) in input_ids:
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.external:
                continue
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out
