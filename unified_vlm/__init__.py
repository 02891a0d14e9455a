"""unified_vlm: a Lightning model zoo for unified vision-language models."""
__version__ = "0.1.0"
