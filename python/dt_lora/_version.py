"""The installed dt-lora's version, for provenance in every file it writes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dt-lora")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
