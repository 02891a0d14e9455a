"""The paper's experiments as data: an experiment file names a base ``fit`` config and axes; the
cells (their cross product) run as ordinary ``fit`` subprocesses (``runner``), and ``report`` turns
their scores and logs into tables and figures. See docs/experiments.md."""
from unified_vlm.experiments.spec import ExperimentSpec, SpecError, load_spec

__all__ = ["ExperimentSpec", "SpecError", "load_spec"]
