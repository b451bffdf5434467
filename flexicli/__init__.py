"""flexicli: adaptive layer skipping (FlexiDepth) for any Hugging Face decoder LLM."""

__version__ = "0.1.0"

__all__ = ["FlexiModel", "LayerParts", "convert", "__version__"]


def __getattr__(name):  # lazy: importing flexicli must not import torch (keeps `flexi --help` instant)
    if name == "FlexiModel":
        from .core.flexi_model import FlexiModel

        return FlexiModel
    if name == "LayerParts":
        from .core.families import LayerParts

        return LayerParts
    if name == "convert":
        from .convert import convert

        return convert
    raise AttributeError(name)
