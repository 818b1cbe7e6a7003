"""The package's typed errors.

Every error a user can cause derives from `ZooError`, and each also derives from
the built-in exception a caller would naturally catch (`ValueError`,
`FileNotFoundError`, ...). Messages name the file, tensor or field, what was
expected and what was received.
"""


class ZooError(Exception):
    """Base class of every error raised on purpose by keras-zoo."""


class ConfigError(ZooError, ValueError):
    """A `config.json` field is missing, malformed or has a value we cannot honour."""


class AdapterError(ConfigError):
    """A LoRA adapter that cannot be made, loaded or used as asked (its config, targets or name)."""


class UnknownArchitectureError(ConfigError):
    """The config names a `model_type` or timm `architecture` keras-zoo does not implement."""


class PresetNotFoundError(ZooError, FileNotFoundError):
    """A preset name, handle or folder does not resolve to a usable model folder."""


class HandleError(PresetNotFoundError, ValueError):
    """A handle is malformed (`hf://org/name[@revision]`, `kaggle://owner/model/framework/variation[/version]`)."""


class HubError(PresetNotFoundError):
    """A download from the Hugging Face Hub or Kaggle failed: missing repo, file or revision, no network, offline."""


class GatedModelError(HubError, PermissionError):
    """The repository is gated: its license must be accepted and a token given."""


class CheckpointError(ZooError, ValueError):
    """A checkpoint file is unreadable, or its tensors do not fit the model."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file is truncated, corrupt, or its header contradicts its contents."""


class MissingWeightsError(CheckpointError):
    """The model has weights the checkpoint does not provide."""


class UnexpectedWeightsError(CheckpointError):
    """The checkpoint has tensors the model's key map neither uses nor ignores."""


class ShapeMismatchError(CheckpointError):
    """A checkpoint tensor's shape does not fit the weight it maps to."""


class ImageError(ZooError, ValueError):
    """An image cannot be opened, decoded or converted."""


class BackendError(ZooError, RuntimeError):
    """No usable Keras backend is installed, or the chosen one cannot run this."""


class GenerationError(ZooError, ValueError):
    """A generation request is malformed: empty prompt, prompt too long, bad limits, unknown sampler."""


class DataError(ZooError, ValueError):
    """Training data that cannot be used: a malformed line, missing fields, unknown roles, too few examples."""


class DistributionError(ZooError, ValueError):
    """A device mesh or layout that cannot hold the model, distribution on a backend without it, or a cluster
    (Ray) that cannot be reached."""
