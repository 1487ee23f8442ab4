"""vitray: Vision Transformers for visual inspection, trained and run on Ray.

The public API lives in the modules (`vitray.train`, `vitray.score`, ...);
they import torch, ray and transformers lazily so that `vitray --help` is fast.
"""
__version__ = "0.1.0"
