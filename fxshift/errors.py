"""The exceptions fxshift raises. Each message names the layer or node and says what to do."""


class FxshiftError(Exception):
    """Base class of every error fxshift raises on purpose."""


class ConfigError(FxshiftError, ValueError):
    """A pass option or a per-layer setting is invalid."""


class TraceError(FxshiftError):
    """torch.fx could not trace the model; the message names the submodule and the construct."""


class RecipeError(FxshiftError):
    """A saved recipe does not fit the model it is loaded into."""


class NativeError(FxshiftError, RuntimeError):
    """A native kernel rejected its arguments or its library could not be loaded."""
