"""explaind-store: an exact, compressed, lazily queryable record of a PyTorch training trajectory.

    from explaind_store import Recorder, open_run
"""

__version__ = "0.1.0"

from .recorder import Recorder, RecorderError  # noqa: E402
from .reader import Run, open_run  # noqa: E402

__all__ = ["Recorder", "RecorderError", "Run", "open_run", "__version__"]
