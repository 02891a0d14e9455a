"""FSDP for a unified VLM with a big backbone: ``--trainer.strategy unified_vlm.fsdp.BackboneFSDP``.

Lightning's ``FSDPStrategy`` needs to be told which modules to shard as units and which to leave
alone, and a config cannot name Python classes well. This strategy reads them off the model when it
is set up: every decoder layer of the language backbone is its own FSDP unit (the class names the
Hugging Face model lists in ``_no_split_modules``, else the class of ``model.layers[i]``), and
frozen vision towers (the understanding encoder, the VQ tokenizer or feature tower) are
``ignored_modules``: replicated on every rank, since they get no gradient and sharding them would
only add all-gathers. ``checkpoint_layers: true`` recomputes each decoder layer's activations in
the backward pass (activation checkpointing). Everything else is ``FSDPStrategy``'s (sharding
strategy, CPU offload, state dict type, ...).
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from torch import nn

from unified_vlm.models.parameter_table import frozen_towers

NAME = "unified_fsdp"
DECODING_REFUSED = (
    "decoding under FSDP: the decoder layers are sharded, so every rank must run the same forward calls in "
    "lockstep, and generation (the probes, test, predict) takes a different number of steps on each rank")


def decoder_layer_classes(lm: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``lm``'s decoder layers (peft wrappers looked through)."""
    names = set()
    for module in lm.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    found = {type(m) for m in lm.modules() if type(m).__name__ in names}
    if not found:
        layers = next((m for name, m in lm.named_modules() if name.endswith("layers") and isinstance(m, nn.ModuleList)), None)
        found = {type(layer) for layer in layers} if layers is not None and len(layers) else set()
    if not found:
        raise ValueError(f"BackboneFSDP: no decoder layers found in the backbone {type(lm).__name__} (no _no_split_modules and "
                         "no `layers` ModuleList); give trainer.strategy an explicit auto_wrap_policy instead")
    return found


def is_fsdp(strategy) -> bool:
    return isinstance(strategy, FSDPStrategy)


def decoding_settings_refused(subcommand: str, config) -> list[str]:
    """The settings of a ``fit`` / ``test`` / ``predict`` under FSDP that would decode (see
    ``DECODING_REFUSED``), as the options that turn them off."""
    if subcommand in ("test", "predict"):
        return [f"{subcommand} (score the saved checkpoint with --trainer.strategy ddp or on one device)"]
    out = []
    if config.get("test_after_fit", True):
        out.append("--test_after_fit false")
    if (config.get("vqa_probe") or {}).get("max_records", 0):
        out.append("--vqa_probe.max_records 0")
    if (config.get("generation_probe") or {}).get("max_images", 0):
        out.append("--generation_probe.max_images 0")
    return out


class BackboneFSDP(FSDPStrategy):
    """``FSDPStrategy`` with the unified model's wrap policy (see the module doc).

    Args:
        checkpoint_layers: activation checkpointing of every decoder layer.
        ignore_frozen_towers: keep frozen vision towers out of FSDP (replicated).
        **kwargs: ``FSDPStrategy``'s (``sharding_strategy``, ``cpu_offload``, ``state_dict_type``, ...).
    """

    strategy_name = "unified_fsdp"

    def __init__(self, checkpoint_layers: bool = False, ignore_frozen_towers: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint_layers = checkpoint_layers
        self.ignore_frozen_towers = ignore_frozen_towers

    def wrap_settings(self, model: nn.Module) -> dict[str, Any]:
        """The FSDP keyword arguments derived from ``model`` (a ``UnifiedVLM``)."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        layers = decoder_layer_classes(model.lm)
        settings: dict[str, Any] = {}
        if "auto_wrap_policy" not in self.kwargs:
            settings["auto_wrap_policy"] = ModuleWrapPolicy(layers)
        if self.ignore_frozen_towers and "ignored_modules" not in self.kwargs:
            settings["ignored_modules"] = frozen_towers(model)
        return settings

    def setup(self, trainer) -> None:
        from lightning.fabric.strategies.fsdp import _activation_checkpointing_kwargs

        model = trainer.lightning_module
        settings = self.wrap_settings(model)
        for tower in settings.get("ignored_modules", []):
            tower.to(self.root_device)  # FSDP moves only what it manages
        self.kwargs.update(settings)
        if self.checkpoint_layers and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = _activation_checkpointing_kwargs(None, decoder_layer_classes(model.lm))
        super().setup(trainer)


if NAME not in StrategyRegistry:
    StrategyRegistry.register(NAME, BackboneFSDP, description="FSDP of the backbone's decoder layers, frozen towers replicated")
