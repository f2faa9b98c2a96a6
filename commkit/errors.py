"""Exceptions raised by commkit."""


class CommError(RuntimeError):
    """A collective failed: a peer closed its connection or reported an error."""


class CommTimeoutError(CommError, TimeoutError):
    """A peer did not arrive within ``timeout_s``; the message names the phase that waited."""


class ConfigError(ValueError):
    """A configuration (SM budget, backend, profile) cannot be used here."""


class KernelFault(RuntimeError):
    """The host execution of a kernel found it breaking the CUDA execution model: a barrier or warp
    collective that not every required thread reaches, or a launch that outran its watchdog."""
