"""Text in, text out: a causal LM's `generate` and `stream` methods, over the model's engines.

Prompts are encoded (optionally through the chat template), checked and made into requests
(`make_request`), and run on an engine sized for them: one slot for a single prompt, a power of
two up to `max_batch` for several, positions for the longest prompt and its new tokens.
"""

import warnings

from zoo.errors import ConfigError, GenerationError
from zoo.generation import samplers
from zoo.generation.engine import bucket, engine_for, make_request


def _requests(model, prompts: list, max_new_tokens, sampler, stop, max_batch, chat: bool, overrides: dict):
    if model.tokenizer is None:
        raise ConfigError("this model has no tokenizer; load a preset with tokenizer.json or tokenizer.model")
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch <= 0:
        raise GenerationError(f"max_batch must be a positive int, got {max_batch!r}")
    chosen = samplers.get(sampler, **overrides)
    stops = [stop] if isinstance(stop, (str, int)) else list(stop or ())
    if not all((isinstance(s, str) and s) or (isinstance(s, int) and not isinstance(s, bool) and s >= 0) for s in stops):
        raise GenerationError(f"stop must hold stop strings (non-empty) and/or token ids (ints >= 0), got {stop!r}")
    stop_strings = [s for s in stops if isinstance(s, str)]
    stop_ids = model.stop_token_ids | {s for s in stops if isinstance(s, int)}
    requests = [make_request(model, _encode(model, p, chat), max_new_tokens, chosen, stop_ids, stop_strings)
                for p in prompts]
    longest = max(len(r.prompt_ids) for r in requests)
    rows = bucket(len(prompts), max_batch) if len(prompts) > 1 else 1
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:  # the engine stops at the model's last position: say so, not silently
        warnings.warn(f"max_new_tokens={max_new_tokens} with a {longest}-token prompt passes the model's {limit} "
                      f"positions; generation stops after {limit - longest} new tokens", UserWarning, stacklevel=3)
    chosen_engine = engine_for(model, rows, bucket(longest + max_new_tokens, limit))
    return chosen_engine, [chosen_engine.enqueue(r) for r in requests]


def _encode(model, prompt, chat: bool) -> list[int]:
    if not isinstance(prompt, str):
        raise GenerationError(f"a prompt must be a string, got {type(prompt).__name__}")
    if not prompt:
        raise GenerationError("the prompt is empty; give some text to continue")
    if chat:
        return model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
    return model.tokenizer.encode(prompt)


def generate(model, prompt, max_new_tokens: int = 64, sampler="greedy", stop=None, *, temperature=None, top_k=None,
             top_p=None, seed=None, max_batch: int = 8, chat: bool = False):
    """Generated text for a prompt, or a list of texts for a list of prompts.

    Args:
        prompt: a string or a list of strings (batched together).
        max_new_tokens: the most tokens to generate per prompt.
        sampler: "greedy", "top_k", "top_p", "random", or a `zoo.generation.Sampler`.
        stop: stop strings and/or stop token ids, besides the model's end-of-sequence tokens.
        temperature, top_k, top_p, seed: override the sampler's settings.
        max_batch: the most prompts decoded together.
        chat: wrap each prompt as a user turn with the tokenizer's chat template.
    """
    if not isinstance(prompt, (str, list, tuple)):
        raise GenerationError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise GenerationError("no prompts given")
    overrides = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    chosen, requests = _requests(model, prompts, max_new_tokens, sampler, stop, max_batch, chat, overrides)
    for _ in chosen.run(requests):
        pass
    texts = [r.text for r in requests]
    return texts[0] if isinstance(prompt, str) else texts


def stream(model, prompt: str, max_new_tokens: int = 64, sampler="greedy", stop=None, *, temperature=None,
           top_k=None, top_p=None, seed=None, chat: bool = False):
    """Yields text pieces as tokens are made; the pieces join to what `generate` returns."""
    overrides = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    chosen, (request,) = _requests(model, [prompt], max_new_tokens, sampler, stop, 1, chat, overrides)
    try:
        for event in chosen.run([request]):
            if event.text:
                yield event.text
    finally:
        if not request.finished:
            chosen.cancel(request)
            chosen.step()
