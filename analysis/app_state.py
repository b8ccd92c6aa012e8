"""Objects the Streamlit pages share, kept free of Streamlit so they can be tested and reused.

The app caches the FP bundle with st.cache_resource, which hands the SAME object to every session:
nothing here or in the pages may modify it. Quantized variants are new models (quant.quantize returns one).
"""
from __future__ import annotations

DEFAULT_MODEL = "bundled:dit-mnist"
HOME_CLASSES = list(range(10))


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
