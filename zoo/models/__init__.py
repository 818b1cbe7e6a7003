"""Model families, one folder each. Each registers its checkpoint formats with `zoo.registry` when imported;
`register_all` imports every family, so that a config.json of any family is recognised."""

import importlib

FAMILIES = ("zoo.models.gemma", "zoo.models.vit")


def register_all() -> None:
    for name in FAMILIES:
        importlib.import_module(name)
