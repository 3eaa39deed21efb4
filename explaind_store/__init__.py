"""explaind-store: an exact, compressed, lazily queryable record of a PyTorch training trajectory.

    from explaind_store import Recorder, open_run
"""

__version__ = "0.1.0"

from .reader import Run, open_run
from .recorder import Recorder, RecorderError
from .storage import StoreError

__all__ = ["Recorder", "RecorderError", "Run", "StoreError", "__version__", "open_run"]
