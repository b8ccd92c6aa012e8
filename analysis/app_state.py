"""Objects the Streamlit pages share, kept free of Streamlit so they can be tested and reused.

The app caches the FP bundle with st.cache_resource, which hands the SAME object to every session:
nothing here or in the pages may modify it. Quantized variants are new models (quant.quantize returns one).

Every result the app shows is keyed by what produced it (model_key: source, device, precision; plus the
settings or recipe of the job), so switching the precision never shows a float32 grid as a float16 one.
Work that is the same for every session (the Home grid, FP salience statistics, FP calibration inputs) is
computed once per process in a SharedWork and handed to every session that asks for the same key.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

DEFAULT_MODEL = "bundled:dit-mnist"
HOME_CLASSES = list(range(10))


def model_key(bundle) -> tuple[str, str, str]:
    """(source, device, precision) of a loaded bundle: what every result of the app is keyed by."""
    return bundle.name, str(bundle.device), str(bundle.dtype).removeprefix("torch.")


def produced_by(key: tuple[str, str, str]) -> str:
    """'bundled:dit-mnist on cpu, float32': the words captions use for a model_key."""
    name, device, dtype = key
    return f"{name} on {device}, {dtype}"


@dataclass(frozen=True)
class Shared:
    """A value computed once for every session: when and in how long, so a caption can say so."""

    value: Any
    computed_at: float  # time.time()
    seconds: float


class SharedWork:
    """Compute-once values shared by every session of the process, one lock per key.

    get(key, compute) returns the stored Shared for `key`, or runs compute() once while every other caller
    asking for the same key waits for it (thirty sessions opening the app together sample the Home grid
    once, not thirty times). Different keys compute in parallel. A failed compute stores nothing, so the next
    caller tries again. The oldest entries are dropped beyond `max_entries` (values are FP results anyone can
    recompute; none is a user's own work). `computed` counts computations per key: what a load test reads.
    """

    def __init__(self, kind: str, max_entries: int = 16, log: Callable[[str], None] | None = None) -> None:
        self.kind = kind
        self.max_entries = max_entries
        self._guard = threading.Lock()
        self._locks: dict[Hashable, threading.Lock] = {}
        self._values: OrderedDict[Hashable, Shared] = OrderedDict()
        self.computed: Counter = Counter()
        self._log = log if log is not None else _stderr

    def peek(self, key: Hashable) -> Shared | None:
        with self._guard:
            return self._values.get(key)

    def get(self, key: Hashable, compute: Callable[[], Any], on_wait: Callable[[], None] | None = None) -> Shared:
        """The shared value for `key`; on_wait() is called when another session is computing it right now."""
        with self._guard:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            lock = self._locks.setdefault(key, threading.Lock())
        if not lock.acquire(blocking=False):
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            with self._guard:
                if key in self._values:  # computed by the session we waited for
                    return self._values[key]
            start = time.perf_counter()
            value = compute()
            shared = Shared(value, time.time(), time.perf_counter() - start)
            with self._guard:
                self._values[key] = shared
                self.computed[key] += 1
                while len(self._values) > self.max_entries:
                    self._values.popitem(last=False)
            self._log(f"dqlab shared work: computed {self.kind} {key!r} in {shared.seconds:.1f} s "
                      f"(computation {sum(self.computed.values())} of this kind in this process)")
            return shared
        finally:
            with self._guard:
                if self._locks.get(key) is lock:  # whoever waited holds the lock object and finds the value
                    del self._locks[key]
            lock.release()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# One per kind of shared work, for the whole process (the pages import this module once per process).
HOME_GRIDS = SharedWork("home grid", max_entries=32)
FP_SALIENCE = SharedWork("FP salience statistics", max_entries=4)
FP_CALIBRATION = SharedWork("FP calibration inputs", max_entries=4)


def owned_variants(variants: dict, origins: dict, key: tuple) -> list[str]:
    """Names of the session's variants quantized from the FP model `key` (model_key): a variant made from the
    float16 model is not shown beside the float32 one."""
    return [name for name in variants if tuple(origins.get(name, ())) == tuple(key)]


def session_view(bundle):
    """A bundle whose denoiser (and VAE) are new module objects sharing the cached bundle's weight tensors: hooks a
    collection installs land on this session's modules only, so another session sampling the shared model at the
    same moment neither sees them nor feeds them its activations. No weight is copied."""
    import copy

    def view(module):
        if module is None:
            return None
        shared = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
        return copy.deepcopy(module, memo=shared)

    import dataclasses

    return dataclasses.replace(bundle, denoiser=view(bundle.denoiser), vae=view(bundle.vae))


class ModelCacheLog:
    """What the app's bounded model cache (pages/_shared.get_bundle) has loaded and evicted, shared by every
    session, so the sidebar can say when a model was evicted to make room and when one was loaded again."""

    def __init__(self, capacity: int):
        import threading

        self.capacity = capacity
        self.order: list[tuple] = []  # loaded keys, oldest first (the cache evicts the least recently loaded)
        self.evicted: list[tuple] = []
        self.reloads = 0
        self._lock = threading.Lock()

    def loaded(self, key: tuple) -> dict:
        """Record a cache miss for `key`; returns {"evicted": [keys pushed out], "reloaded": bool}."""
        with self._lock:
            reloaded = key in self.evicted
            if reloaded:
                self.evicted.remove(key)
                self.reloads += 1
            if key in self.order:
                self.order.remove(key)
            self.order.append(key)
            out = []
            while len(self.order) > self.capacity:
                old = self.order.pop(0)
                self.evicted.append(old)
                out.append(old)
            return {"evicted": out, "reloaded": reloaded}

    def touched(self, key: tuple) -> None:
        """A cache hit: the key becomes the most recently used, as in the cache's own LRU order."""
        with self._lock:
            if key in self.order:
                self.order.remove(key)
                self.order.append(key)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return len(self.evicted), self.reloads
