"""Importing this package registers every built-in component."""
from unified_vlm.models import backbones, heads, projectors  # noqa: F401

for _optional in ("quantizers", "encoders"):
    __import__(f"unified_vlm.models.{_optional}")
