"""`LeanAttributes`: Keras layers that are cheaper to make, most of all on TensorFlow.

On TensorFlow every attribute a Keras layer sets, its own and those `keras.layers.Layer.__init__`
and `build` set (~90 per layer), runs three trackers in turn: Keras' (is it a variable, a
layer, a metric, a seed generator, a list to wrap?), then Keras' and TensorFlow's
`sticky_attribute_assignment` (is it a TensorFlow `Trackable` to depend on?), each of the last
two first reading the old value (an AttributeError raised and caught for a new attribute). A
class that lists this mixin first does what those three would do, directly:

- a plain value (a number, a string, a function, a dtype policy, an input spec: 11.9k of the
  18.4k attribute sets building the 1 GB ViT of benchmarks/load.py) is stored as it is;
- a list, dict or set (~20 a layer, Keras' and TensorFlow's own bookkeeping) is wrapped by
  Keras' tracker, its name noted in the layer's `_tracked`, and stored (~2.5 us instead of 7.6);
- a variable or a layer is tracked by Keras' tracker and by TensorFlow's `_track_trackable`, once
  (through Keras, both `sticky_attribute_assignment`s call it, the second time to no effect).

Tuples (which TensorFlow may wrap), `NoDependency`, container subclasses, a value replacing a
tracked one, a tracked value set through a class attribute (a property), one set while Keras'
tracking is off, and any class whose `__setattr__` chain is not exactly `keras.layers.Layer`'s
go through Keras as before. tests/test_weights.py checks that a layer ends up with the same
attributes, Keras collections and TensorFlow dependencies either way, which also checks a newer
Keras or TensorFlow against what is reproduced here.

On every backend Keras reads the signatures of a layer's `__init__` (twice), `call` and `build`
each time it makes or builds one (15-40 us each). `inspect` returns a function's `__signature__`
as it is, so each class stores the signatures of the three functions it uses, its own or those it
inherits from Keras, once: the same `Signature` objects inspect would compute. Loading the 1 GB
ViT in one TensorFlow process took 0.158 s a time without them and 0.140 s with them (medians of
8 alternating loads).
"""

import collections
import inspect
import types

import keras

from zoo import backend

_ROUTE: dict[type, str] = {}  # type of a value -> "plain", "container", "trackable" or "keras" (see _route)
_CLASS_NAMES: dict[type, frozenset | None] = {}  # layer class -> its attribute names; None: not lean (_class_names)
_CONTAINERS = (list, dict, set, collections.OrderedDict)  # the exact types Keras' tracker wraps
_UNSEEN = object()


def _route(kind: type) -> str:
    """How `LeanAttributes` stores a value of this type.

    "plain": no tracker takes it; "container": Keras' tracker wraps it (TrackedList, ...) and
    TensorFlow leaves the wrapper alone; "trackable": a TensorFlow `Trackable` both track as it
    is; "keras": anything else a tracker may want (a tuple, which TensorFlow may wrap, a
    `NoDependency`, a container subclass), left to Keras.
    """
    route = _ROUTE.get(kind)
    if route is None:
        from tensorflow.python.trackable import base, data_structures

        containers = (list, dict, set, frozenset, tuple, data_structures.NoDependency)
        if not issubclass(kind, (*containers, base.Trackable, keras.Variable, keras.layers.Layer,
                                 keras.metrics.Metric, keras.random.SeedGenerator)):
            route = "plain"
        elif kind in _CONTAINERS:
            route = "container"
        elif issubclass(kind, base.Trackable) and not issubclass(kind, containers):
            route = "trackable"
        else:
            route = "keras"
        _ROUTE[kind] = route
    return route


def _setattr_chain(cls: type) -> tuple:
    return tuple(c.__dict__["__setattr__"] for c in cls.__mro__
                 if "__setattr__" in c.__dict__ and c is not LeanAttributes)


def _class_names(cls: type) -> frozenset | None:
    """The class's attribute names when its attribute sets run exactly Keras' trackers, else None."""
    if cls not in _CLASS_NAMES:
        base = keras.layers.Layer
        lean = _setattr_chain(cls) == _setattr_chain(base) and cls._setattr_hook is base._setattr_hook
        _CLASS_NAMES[cls] = frozenset(dir(cls)) if lean else None
    return _CLASS_NAMES[cls]


def _keras_tracking_enabled():
    try:
        from keras.src.utils.tracking import is_tracking_enabled
    except ImportError:  # another Keras layout: every tracked value goes through Keras
        return lambda: False
    return is_tracking_enabled


def _remember_signatures(cls: type) -> None:
    for name in ("__init__", "call", "build"):
        function = getattr(cls, name, None)
        if (isinstance(function, types.FunctionType) and not hasattr(function, "__wrapped__")
                and "__signature__" not in function.__dict__):
            function.__signature__ = inspect.signature(function)


class LeanAttributes:
    """Mixin for Keras layers (list it before the Keras base): see the module docstring."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _remember_signatures(cls)

    if backend.NAME == "tensorflow":
        _tracking_enabled = staticmethod(_keras_tracking_enabled())

        def __setattr__(self, name, value):
            own = self.__dict__
            names = _CLASS_NAMES.get(type(self), _UNSEEN)
            if names is _UNSEEN:
                names = _class_names(type(self))
            if names is not None and "_tracker" in own and _route(type(own.get(name))) == "plain":
                route = _route(type(value))
                if route == "plain":
                    object.__setattr__(self, name, value)
                    return
                if route != "keras" and name not in names:
                    if not getattr(self, "_self_setattr_tracking", True):  # both sticky assignments are off
                        object.__setattr__(self, name, self._tracker.track(value))
                        return
                    if self._tracking_enabled():
                        value = self._tracker.track(value)
                        if route == "container":
                            if hasattr(self, "_tracked"):  # Keras' TrackedList.append would track the name: a no-op
                                list.append(self._tracked, name)
                        else:
                            self._track_trackable(value, name=name, overwrite=True)
                        object.__setattr__(self, name, value)
                        return
            super().__setattr__(name, value)
