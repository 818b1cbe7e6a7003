"""The linear modules of a model as its reference implementation names them, found from its key map.

A PEFT adapter names the modules it adapts (`model.layers.0.self_attn.q_proj`); a key map row that
fills a projection's kernel from `<module>.weight` says which of our layers that module is. A row
that splits one tensor over several kernels (timm's fused `qkv`) makes one module of several layers.
"""

import re
from dataclasses import dataclass

import keras

from zoo.errors import AdapterError
from zoo.key_map import layer_indices, weights_by_path
from zoo.layers.dense import EinsumDense
from zoo.lora.config import Settings


@dataclass(frozen=True, eq=False)
class Module:
    """One linear module of the reference and the projection(s) that hold its weight.

    Args:
        name: the module's name in the reference as the installed transformers names it, the one
            `save_adapter` writes (`vit.layers.0.attention.q_proj`).
        aliases: other names adapters use for it (`vit.encoder.layer.0.attention.attention.query`,
            transformers 4's).
        layers: our projections, in the order the reference stacks their outputs.
        index: the decoder/encoder layer it belongs to (for `layers_to_transform`), or None.
    """

    name: str
    aliases: tuple[str, ...]
    layers: tuple[EinsumDense, ...]
    index: int | None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def in_size(self) -> int:
        return self.layers[0].out_in_shape[1]

    @property
    def out_sizes(self) -> tuple[int, ...]:
        return tuple(layer.out_in_shape[0] for layer in self.layers)


def modules(model) -> list[Module]:
    """Every linear module of the model's checkpoint layout that keras-zoo can adapt, in key map order."""
    weights = weights_by_path(model)
    renames = [(re.compile(pattern), replacement) for pattern, replacement in model._lora_renames()]
    found = []
    for row in model.key_map(model.config):
        targets = row.targets
        if not (targets and row.source.endswith(".weight") and all(t.endswith("/kernel") for t in targets)):
            continue
        for index in layer_indices(row, weights):
            paths = [t.replace("{i}", index) if index is not None else t for t in targets]
            layers = tuple(_layer_at(model, path[: -len("/kernel")]) for path in paths)
            if not all(isinstance(layer, EinsumDense) and layer.out_in_shape for layer in layers):
                continue  # a convolution or an embedding: not a linear module
            source = row.source[: -len(".weight")]
            source = source.replace("{i}", index) if index is not None else source
            current = source
            for pattern, replacement in renames:
                current = pattern.sub(replacement, current)
            aliases = (source,) if current != source else ()
            found.append(Module(current, aliases, layers, int(index) if index is not None else None))
    return found


def by_name(found: list[Module]) -> dict[str, Module]:
    """Each module under each of its names."""
    return {name: module for module in found for name in module.names}


def _layer_at(model, path: str):
    """The layer at a weight path (`backbone/layers_0/self_attn/q_proj`): our layers are attributes named
    as the layers, or items of a list attribute."""
    layer = model
    for part in path.split("/"):
        child = getattr(layer, part, None)
        if not (isinstance(child, keras.layers.Layer) and child.name == part):
            lists = [v for v in vars(layer).values() if isinstance(v, (list, tuple))]
            child = next((x for v in lists for x in v if isinstance(x, keras.layers.Layer) and x.name == part), None)
        if child is None:
            return None
        layer = child
    return layer


def examples(found: list[Module]) -> str:
    """How the model names its linear modules, for an error message."""
    short = sorted({m.name.rsplit(".", 1)[-1] for m in found})
    return f"its linear modules are named {short} (e.g. {found[0].name!r})" if found else "it has no linear modules"


def targeted(settings: Settings, found: list[Module], where: str) -> list[Module]:
    """The modules `settings` adapts (its target_modules and layers), at least one."""
    chosen = [m for m in found if settings.targets(m.names, m.index)]
    if not chosen:
        raise AdapterError(f"{where}: target_modules {settings.target_modules!r} select no module of this model; "
                           f"{examples(found)}")
    return chosen


def heads(names: tuple[str, ...], found: list[Module], where: str) -> list[Module]:
    """The modules `modules_to_save` names, each name matching at least one."""
    chosen = []
    for wanted in names:
        matches = [m for m in found if any(n == wanted or n.endswith("." + wanted) for n in m.names)]
        if not matches:
            raise AdapterError(f"{where}: modules_to_save names {wanted!r}, which this model does not have; "
                               f"{examples(found)}")
        chosen += matches
    return chosen
