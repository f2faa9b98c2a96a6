"""commkit: expert-parallel dispatch/combine for mixture-of-experts layers.

``Buffer`` is the API: ``dispatch`` sends each token to the ranks that host its top-k experts,
``combine`` brings the expert outputs back summed per token. ``commkit.reference`` holds the exact
semantics as pure functions over all ranks' inputs. Importing commkit needs neither CuPy nor a GPU.
"""

from commkit.buffer import Buffer
from commkit.errors import CommError, CommTimeoutError, ConfigError, KernelFault
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "CombineOutput",
    "CommError",
    "CommTimeoutError",
    "ConfigError",
    "DispatchOutput",
    "EventHandle",
    "Handle",
    "KernelFault",
    "Layout",
    "__version__",
]
