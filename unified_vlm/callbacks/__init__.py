from unified_vlm.callbacks.checkpoint import RunCheckpoint
from unified_vlm.callbacks.evaluation_report import EvaluationReport
from unified_vlm.callbacks.generation_probe import GenerationProbe
from unified_vlm.callbacks.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from unified_vlm.callbacks.prediction_writer import PredictionWriter
from unified_vlm.callbacks.vqa_probe import VQAProbe

__all__ = ["EvaluationReport", "GenerationProbe", "NonFiniteLossError", "NonFiniteLossGuard", "PredictionWriter",
           "RunCheckpoint", "VQAProbe"]
