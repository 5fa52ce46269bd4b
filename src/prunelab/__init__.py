"""prunelab: make a transformer sparse, and measure what it cost and what it bought."""

from prunelab.errors import PrunelabError

__version__ = "0.1.0"
__all__ = ["PrunelabError", "__version__"]
