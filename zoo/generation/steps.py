"""Each model's compiled prefill and decode steps and its engines, kept here and not on the model.

Compiling is the backend's business (`zoo.backends.compile_step`). A compiled step keeps the
weights it was made with, so `refresh()` makes them again once the set of weights has changed
(`enable_lora`) or the active adapter has (`set_adapter`); engines refresh per `run` and `warm_up`, not per step (listing weights costs ~0.5 ms).
"""

from keras import ops

from zoo import backends


def copy_rows(cache, sources, targets):
    """The cache with rows `targets` (n,) made copies of rows `sources` (n,): choices of one prompt share its prefill."""
    starts = ops.zeros_like(targets)
    return tuple(backends.write_slices(c, targets, starts, ops.take(c, sources, axis=0)) for c in cache)


class CompiledSteps:
    """`prefill(token_ids, lengths, slots, cache)`, `decode(token_ids, positions, cache)` and
    `copy_rows(cache, sources, targets)`, compiled."""

    def __init__(self, model):
        self.model = model
        self._signature = None
        self.prefill = self.decode = self.copy_rows = None
        self.refresh()

    def refresh(self) -> None:
        signature = self.model.program_signature()
        if signature != self._signature:
            self.prefill = backends.compile_step(self.model, self.model.prefill, cache_arg=3)
            self.decode = backends.compile_step(self.model, self.model.decode, cache_arg=2)
            self.copy_rows = backends.compile_step(self.model, copy_rows, cache_arg=0)
            self._signature = signature


class ModelGeneration:
    """What generation keeps for one model: its compiled steps and its engines by shape (`engine.engine`)."""

    def __init__(self, model):
        self.steps = CompiledSteps(model)
        self.engines = {}


def state(model) -> ModelGeneration:
    """The model's generation state, kept in the model's own __dict__ so that it lives and dies with the
    model (the compiled steps refer to the model: a table keyed by models would keep every model alive)."""
    found = model.__dict__.get("_zoo_generation")
    if found is None:
        found = model.__dict__["_zoo_generation"] = ModelGeneration(model)
    return found


def compiled_steps(model) -> CompiledSteps:
    """The model's compiled prefill and decode steps, shared by all its engines."""
    return state(model).steps
