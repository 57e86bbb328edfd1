"""VLM Defense Atlas: a catalog and reproduction workbench for adversarial defenses of VLMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlmdefense")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
