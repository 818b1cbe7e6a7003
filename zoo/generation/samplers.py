"""Samplers: pick the next token from one sequence's logits, on the host, with a per-request RNG.

Sampling runs outside the compiled step, so its parameters change per request without
recompiling, and a request's draws depend only on its own seed, never on which other requests
share the batch.
"""

from dataclasses import dataclass

import numpy as np

from zoo.errors import GenerationError


@dataclass(frozen=True)
class Sampler:
    """Temperature, top-k and top-p (nucleus) sampling; temperature 0 is greedy.

    Args:
        temperature: divides the logits; 0 picks the most likely token.
        top_k: keep only the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens whose probability reaches p (1: all).
        seed: seeds this request's generator; None draws fresh entropy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise GenerationError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise GenerationError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise GenerationError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        # NumPy seeds with non-negative ints; a negative seed (OpenAI's API allows them) is taken modulo 2**64.
        return np.random.default_rng(self.seed if self.seed is None or self.seed >= 0 else self.seed % 2**64)

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        """One token id from logits (vocab,)."""
        if self.greedy:
            return int(np.argmax(logits))  # the first maximum, as torch.argmax
        scores = logits.astype(np.float64) / self.temperature
        if not self.top_k and self.top_p >= 1.0:  # the whole distribution: no ordering needed (a sort costs ~2 ms)
            cumulative = np.cumsum(np.exp(scores - scores.max()))
            index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
            return min(index, len(cumulative) - 1)
        candidates = np.arange(scores.shape[-1])
        if self.top_k and self.top_k < scores.shape[-1]:
            candidates = np.argpartition(-scores, self.top_k - 1)[: self.top_k]
        order = candidates[np.argsort(-scores[candidates], kind="stable")]  # most likely first
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if self.top_p < 1.0:
            # Keep tokens until the cumulative probability reaches top_p (the crossing token included).
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        index = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
        return int(order[min(index, len(order) - 1)])


def log_probs(logits: np.ndarray, temperature: float = 0.0) -> np.ndarray:
    """Log-softmax over the last axis of logits / temperature (of the logits themselves at temperature 0: the
    model's own distribution, what greedy decoding picks from), in float64."""
    scores = logits.astype(np.float64) / (temperature or 1.0)
    top = scores.max(axis=-1, keepdims=True)
    return scores - top - np.log(np.exp(scores - top).sum(axis=-1, keepdims=True))


def top_log_probs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, log-probability) of one position's log-probabilities, most likely first."""
    if k <= 0:
        return []
    ids = np.argpartition(-logprobs, k - 1)[:k] if k < logprobs.shape[-1] else np.arange(logprobs.shape[-1])
    ids = ids[np.lexsort((ids, -logprobs[ids]))]  # by log-probability, then the lower id first
    return [(int(i), float(logprobs[i])) for i in ids]


def GreedySampler() -> Sampler:  # noqa: N802  (named like keras-hub's sampler classes)
    return Sampler()


def RandomSampler(temperature: float = 1.0, seed: int | None = None) -> Sampler:  # noqa: N802
    return Sampler(temperature=temperature, seed=seed)


def TopKSampler(k: int = 5, temperature: float = 1.0, seed: int | None = None) -> Sampler:  # noqa: N802
    return Sampler(temperature=temperature, top_k=k, seed=seed)


def TopPSampler(p: float = 0.9, temperature: float = 1.0, k: int = 0, seed: int | None = None) -> Sampler:  # noqa: N802
    return Sampler(temperature=temperature, top_k=k, top_p=p, seed=seed)


NAMED = {"greedy": GreedySampler, "random": RandomSampler, "temperature": RandomSampler, "top_k": TopKSampler,
         "top_p": TopPSampler}


def get(sampler: "str | Sampler | None", **overrides) -> Sampler:
    """A Sampler from a name ("greedy", "top_k", "top_p", "random"), an instance, or None (greedy)."""
    if sampler is None:
        sampler = Sampler()
    elif isinstance(sampler, str):
        if sampler not in NAMED:
            raise GenerationError(f"unknown sampler {sampler!r}; expected one of {sorted(NAMED)} or a Sampler")
        sampler = NAMED[sampler]()
    elif not isinstance(sampler, Sampler):
        raise GenerationError(f"sampler must be a name or a zoo.generation.Sampler, got {type(sampler).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        fields = {**sampler.__dict__, **overrides}
        sampler = Sampler(**fields)
    return sampler
