from unified_vlm.callbacks.evaluation_report import EvaluationReport

__all__ = ["EvaluationReport"]
