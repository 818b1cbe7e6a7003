"""`LeanAttributes`: Keras layers whose plain attributes skip Keras' and TensorFlow's tracking on TensorFlow.

On TensorFlow every attribute a Keras layer sets, its own and those `keras.layers.Layer.__init__`
and `build` set (~90 per layer), runs three trackers in turn: Keras' (is it a variable, a
layer, a metric, a seed generator, a list to wrap?), then Keras' and TensorFlow's
`sticky_attribute_assignment` (is it a TensorFlow `Trackable` to depend on?). For a number, a
string, a function, a dtype policy or an input spec every one of them answers no and stores the
value as it is. A class that lists this mixin first stores those values directly: building the
1 GB ViT of benchmarks/load.py sets 18.4k attributes, 11.9k of them such values, and took
0.19-0.20 s with all of them tracked, 0.15-0.16 s with this mixin. Anything a tracker could want
(variables, layers, metrics, seed generators, lists, dicts, sets, tuples, any TensorFlow
`Trackable`), and any value replacing one, still goes through Keras. Properties keep their
setters (`object.__setattr__` honours descriptors). The other backends are unchanged.
"""

import keras

from zoo import backend

_PLAIN: dict[type, bool] = {}  # type -> whether no tracker takes values of it


def _tracked_types() -> tuple[type, ...]:
    from tensorflow.python.trackable import base, data_structures

    return (list, dict, set, frozenset, tuple, base.Trackable, data_structures.NoDependency, keras.Variable,
            keras.layers.Layer, keras.metrics.Metric, keras.random.SeedGenerator)


def _plain(kind: type) -> bool:
    plain = _PLAIN.get(kind)
    if plain is None:
        plain = _PLAIN[kind] = not issubclass(kind, _tracked_types())
    return plain


class LeanAttributes:
    """Mixin for Keras layers (list it before the Keras base): see the module docstring."""

    if backend.NAME == "tensorflow":
        def __setattr__(self, name, value):
            own = self.__dict__
            if "_tracker" in own and _plain(type(value)) and _plain(type(own.get(name))):
                object.__setattr__(self, name, value)
            else:
                super().__setattr__(name, value)
