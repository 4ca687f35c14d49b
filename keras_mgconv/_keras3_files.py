"""Reading a `.keras` file that Keras 3 wrote into tf_keras (Keras 2).

Both Kerases write a zip of `config.json`, `metadata.json` and
`model.weights.h5`, in layouts the other cannot read:

- `config.json`: Keras 3 writes a layer's inbound tensors as
  `{"args": [...], "kwargs": {...}}` of `"__keras_tensor__"` objects, tf_keras
  as `[layer, node, tensor, kwargs]` lists; Keras 3's InputLayer has
  `batch_shape` and `optional` where tf_keras' has `batch_input_shape`; Keras 3
  writes dtype policies as objects (tf_keras: their names), and options that
  tf_keras' classes lack (`Dense(quantization_config=None)`, an initializer's
  `input_axes=None`) even where they are unset.
- `model.weights.h5`: Keras 3 stores each layer's own variables as
  `.../vars/0, 1, ...`, under groups named by the attribute or the class that
  led to the layer, each `vars` group holding the layer's name; tf_keras reads
  its own layout only. Here every layer is found by its names, from the model
  down, and given its variables in Keras 3's order (trainable, then
  non-trainable, as created), which the same layer code creates alike in both.

Only `keras_mgconv.optimization` imports this module, under tf_keras.
"""

import inspect
import io
import json
import zipfile

import h5py
import numpy as np

from keras_mgconv._keras import keras

# Keyword arguments every tf_keras layer takes besides its own.
_LAYER_KEYWORDS = {
    "name",
    "trainable",
    "dtype",
    "dynamic",
    "input_dim",
    "input_shape",
    "batch_input_shape",
    "batch_size",
    "weights",
    "activity_regularizer",
    "autocast",
    "implementation",
}
# Where Keras 3 serializes built-in objects, and where tf_keras keeps them.
_MODULES = {
    "keras.layers": keras.layers,
    "keras.initializers": keras.initializers,
    "keras.regularizers": keras.regularizers,
    "keras.constraints": keras.constraints,
}
_DTYPE_POLICIES = ("DTypePolicy", "FloatDTypePolicy")
# Keras 3's registered names of its model classes, and tf_keras' classes.
_MODELS = {"Functional": keras.Model, "Sequential": keras.Sequential}


class UnreadableFile(Exception):
    """The file cannot be read into tf_keras; the message says why."""


def written_by_keras_3(path):
    """Whether the `.keras` archive at `path` was written by Keras 3."""
    with zipfile.ZipFile(path) as archive:
        metadata = json.loads(archive.read("metadata.json"))
    return int(str(metadata.get("keras_version", "0")).split(".")[0]) >= 3


def load(path):
    """The tf_keras model of the Keras 3 `.keras` file at `path`, with its weights.

    Raises:
        UnreadableFile: for a configuration or weights that tf_keras cannot hold.
    """
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        weights = archive.read("model.weights.h5")
    try:
        model = keras.saving.deserialize_keras_object(
            _object(config, "model"), custom_objects=_MODELS
        )
    except UnreadableFile:
        raise
    except Exception as error:  # tf_keras fails in many ways on what it cannot build.
        raise UnreadableFile(
            f"tf_keras cannot build its model ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300]})"
        ) from error
    with h5py.File(io.BytesIO(weights), "r") as store:
        _assign(model, _stored_variables(store))
    return model


def _object(config, where):
    """A Keras 3 serialized object (a dict with "class_name"), as tf_keras writes it."""
    if config.get("class_name") in _DTYPE_POLICIES:
        return config["config"]["name"]
    inner = config.get("config")
    if not isinstance(inner, dict):
        return {key: value for key, value in config.items() if key != "shared_object_id"}
    inner = dict(inner)
    name = inner.get("name", where)
    if config["class_name"] == "InputLayer":
        inner["batch_input_shape"] = inner.pop("batch_shape", None)
        if inner.pop("optional", False):
            raise UnreadableFile(f"its input {name!r} is optional, which tf_keras lacks")
    if "layers" in inner:
        inner = _model_config(inner)
    inner = {
        key: value
        if key in ("layers", "input_layers", "output_layers")
        else _value(value, f"{name}.{key}")
        for key, value in inner.items()
    }
    module = config.get("module") or ""
    if module in _MODULES and not config.get("registered_name"):
        inner = _known_options(getattr(_MODULES[module], config["class_name"], None), inner, name)
    translated = {"class_name": config["class_name"], "config": inner}
    # Keras 3's models are in modules tf_keras lacks (keras.src.models...):
    # they are found by their registered names, in `_MODELS`.
    if not module.startswith("keras.src."):
        translated["module"] = module
    if config.get("registered_name"):
        translated["registered_name"] = config["registered_name"]
    return translated


def _value(value, where):
    if isinstance(value, dict):
        if "class_name" in value:
            return _object(value, where)
        return {key: _value(item, where) for key, item in value.items()}
    if isinstance(value, list):
        return [_value(item, where) for item in value]
    return value


def _known_options(cls, config, name):
    """`config` without the unset options that tf_keras' `cls` does not take."""
    if cls is None:
        return config
    # A class that passes **kwargs on takes its bases' keywords too.
    known = set()
    for base in cls.__mro__:
        if "__init__" not in vars(base):
            continue
        if base is keras.layers.Layer:
            known |= _LAYER_KEYWORDS
            break
        parameters = inspect.signature(base.__init__).parameters
        known |= set(parameters)
        if not any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters.values()):
            break
    else:
        return config
    unknown = {key: value for key, value in config.items() if key not in known}
    set_options = {key: value for key, value in unknown.items() if value not in (None, False)}
    if set_options:
        raise UnreadableFile(
            f"its {cls.__name__} {name!r} sets "
            f"{', '.join(f'{key}={value!r}' for key, value in set_options.items())}, "
            f"which tf_keras' {cls.__name__} lacks"
        )
    return {key: value for key, value in config.items() if key in known}


def _model_config(config):
    """A functional or Sequential model's config, with tf_keras' layers and inbound nodes.

    tf_keras gives a model built on an Input a call of its own (node 0), and
    numbers the calls of a nested one from 1; Keras 3 from 0.
    """
    nested_models = {
        entry.get("name")
        for entry in config["layers"]
        if entry.get("config", {}).get("layers", [{}])[0].get("class_name") == "InputLayer"
    }

    def history(reference):
        layer, node, tensor = reference
        return [layer, node + (layer in nested_models), tensor]

    def node(call, layer):
        if isinstance(call, list):  # Already tf_keras' form.
            return call
        return [[*history(inbound), kwargs] for inbound, kwargs in _inbound(call, layer)]

    def entry(layer):
        # A Sequential model's layers have neither a name beside their config
        # nor inbound nodes.
        translated = _object(layer, layer.get("name", "layer"))
        if "name" in layer:
            translated["name"] = layer["name"]
        if "inbound_nodes" in layer:
            translated["inbound_nodes"] = [
                node(call, layer["name"]) for call in layer["inbound_nodes"]
            ]
        return translated

    translated = {**config, "layers": [entry(layer) for layer in config["layers"]]}
    for key in ("input_layers", "output_layers"):
        if key in config:
            references = config[key]
            single = bool(references) and not isinstance(references[0], list)
            references = [
                history(reference) for reference in ([references] if single else references)
            ]
            translated[key] = references[0] if single else references
    return translated


def _inbound(call, layer):
    """The inbound tensors of a Keras 3 call of `layer` ({"args", "kwargs"}), each with
    the keyword arguments that tf_keras keeps beside it: [(keras history, kwargs)]."""
    args, kwargs = call.get("args", []), call.get("kwargs", {})

    def history(tensor):
        if not (isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__"):
            raise UnreadableFile(
                f"layer {layer!r} is called on {tensor!r:.100}, not on the outputs of other layers"
            )
        return tensor["config"]["keras_history"]

    if len(args) != 1 or any(
        isinstance(value, dict) and "class_name" in value for value in kwargs.values()
    ):
        raise UnreadableFile(
            f"layer {layer!r} is called with {len(args)} positional arguments or with "
            f"tensors as keyword arguments; tf_keras takes one input or a list of inputs"
        )
    inputs = args[0] if isinstance(args[0], list) else [args[0]]
    return [
        (history(tensor), dict(kwargs) if index == 0 else {}) for index, tensor in enumerate(inputs)
    ]


def _stored_variables(store):
    """{(layer names, model first): [arrays]} of a Keras 3 weights file.

    Every `vars` group holds one layer's own variables and, as an attribute,
    its name; the layers above it are those of the `vars` groups of the groups
    above. The optimizer's variables are left out.
    """
    found = {}

    def visit(group, owner):
        if "vars" in group:
            variables = group["vars"]
            if "name" not in variables.attrs:
                raise UnreadableFile(f"its weights group {variables.name} has no layer name")
            owner = (*owner, str(variables.attrs["name"]))
            found[owner] = [np.asarray(variables[str(index)]) for index in range(len(variables))]
        for key in group:
            if key != "vars" and isinstance(group[key], h5py.Group):
                visit(group[key], owner)

    root = (str(store["vars"].attrs.get("name", "model")),) if "vars" in store else ("model",)
    if "vars" in store and len(store["vars"]):
        found[root] = [np.asarray(store["vars"][str(i)]) for i in range(len(store["vars"]))]
    if "layers" in store:
        visit(store["layers"], root)
    return found


def _own_variables(layer):
    """A tf_keras layer's own variables (not its sublayers'), in Keras 3's saving order."""
    return [*layer._trainable_weights, *layer._non_trainable_weights]


def _assign(model, stored):
    assigned = set()
    for names, values in stored.items():
        layer = model
        for name in names[1:]:
            sublayers = {
                sub.name: sub for sub in layer._flatten_layers(include_self=False, recursive=False)
            }
            if name not in sublayers:
                raise UnreadableFile(
                    f"its weights are for a layer {'/'.join(names)!r} that the model "
                    f"tf_keras builds from its config does not have"
                )
            layer = sublayers[name]
        variables = _own_variables(layer)
        shapes = [tuple(variable.shape) for variable in variables]
        if shapes != [value.shape for value in values]:
            raise UnreadableFile(
                f"its layer {'/'.join(names)!r} stores variables of shapes "
                f"{[value.shape for value in values]}, and tf_keras' has {shapes}"
            )
        for variable, value in zip(variables, values):
            variable.assign(value.astype(variable.dtype.as_numpy_dtype))
            assigned.add(id(variable))
    missing = [variable.name for variable in model.weights if id(variable) not in assigned]
    if missing:
        raise UnreadableFile(
            f"it holds no values for {len(missing)} of the model's variables "
            f"({', '.join(missing[:3])}, ...)"
        )
    # As tf_keras' own loading does: an adapted Normalization computes with
    # constants that it derives from its variables here.
    for layer in model._flatten_layers():
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()
