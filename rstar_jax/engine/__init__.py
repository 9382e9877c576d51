"""The inference engine: fixed decode slots, continuous batching, chunked prefill, stops found on device,
sharded over the mesh (`engine.Engine`); `generate` is a thin wrapper over it.

Names are imported on first use, so `rstar_jax.config` can take `EngineConfig` without importing JAX programs."""

import importlib

_WHERE = {"Completion": "api", "Request": "api", "RequestError": "api", "SamplingConfig": "api",
          "EngineConfig": "config", "Engine": "engine", "Finished": "engine", "generate": "wrapper",
          "prompt_keys": "wrapper", "InferenceModel": "model", "prepare": "model"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'rstar_jax.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rstar_jax.engine.{_WHERE[name]}"), name)
