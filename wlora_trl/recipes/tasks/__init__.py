"""Datasets the examples train and evaluate on: loading (local folder or hub), row checks, formatting, scoring.

One module per dataset; each checks every row it loads before any training starts, so a broken file fails in
seconds with the file, line and field at fault instead of minutes later inside a tokenizer.
"""

from .common import DataFormatError

__all__ = ["DataFormatError"]
