"""Text generation: samplers, stop rules, and the continuous-batching engine."""

from zoo.generation.engine import Event, GenerationEngine, Request, bucket
from zoo.errors import GenerationError
from zoo.generation.samplers import (
    GreedySampler,
    RandomSampler,
    Sampler,
    TopKSampler,
    TopPSampler,
)
from zoo.generation.text import TextStream

__all__ = ["Event", "GenerationEngine", "GenerationError", "GreedySampler", "RandomSampler", "Request", "Sampler",
           "TextStream", "TopKSampler", "TopPSampler", "bucket"]
