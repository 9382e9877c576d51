"""The inference engine: fixed decode slots, continuous batching, chunked prefill, stops found on device,
sharded over the mesh (`engine.Engine`); `generate` is a thin wrapper over it."""

from rstar_jax.engine.api import Completion, Request, RequestError, SamplingConfig
from rstar_jax.engine.config import EngineConfig
from rstar_jax.engine.engine import Engine, Finished
from rstar_jax.engine.generate import generate, prompt_keys
from rstar_jax.engine.model import InferenceModel, prepare

__all__ = ["Completion", "Engine", "EngineConfig", "Finished", "InferenceModel", "Request", "RequestError",
           "SamplingConfig", "generate", "prepare", "prompt_keys"]
