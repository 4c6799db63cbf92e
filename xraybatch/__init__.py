"""xraybatch: a DICOM-native batch processor for chest radiographs.

Results are AI generated and not for diagnostic use.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
