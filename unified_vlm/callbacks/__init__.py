from unified_vlm.callbacks.evaluation_report import EvaluationReport
from unified_vlm.callbacks.prediction_writer import PredictionWriter

__all__ = ["EvaluationReport", "PredictionWriter"]
