"""Importing this package registers every built-in component in ``unified_vlm.registry``."""
from unified_vlm.models import backbones, encoders, heads, projectors, quantizers  # noqa: F401
