"""Text generation: samplers, stop rules, the continuous-batching engine and each model's compiled steps."""

from zoo.errors import GenerationError
from zoo.generation.api import generate, stream
from zoo.generation.engine import Event, GenerationEngine, Request, bucket, engine_for, make_request
from zoo.generation.samplers import (
    GreedySampler,
    RandomSampler,
    Sampler,
    TopKSampler,
    TopPSampler,
)
from zoo.generation.steps import compiled_steps
from zoo.generation.text import TextStream

__all__ = ["Event", "GenerationEngine", "GenerationError", "GreedySampler", "RandomSampler", "Request", "Sampler",
           "TextStream", "TopKSampler", "TopPSampler", "bucket", "compiled_steps", "engine_for", "generate",
           "make_request", "stream"]
