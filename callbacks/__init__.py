"""Evaluation and logging callbacks (installed as ``lit_vlm.callbacks``)."""

from lit_vlm.callbacks.base import EvalCallback
from lit_vlm.callbacks.captioning import CaptionEvaluation
from lit_vlm.callbacks.compositional import CompositionalEvaluation
from lit_vlm.callbacks.fewshot import FewShotEvaluation
from lit_vlm.callbacks.monitor import DataStats, SamplesPerSecond
from lit_vlm.callbacks.pope import POPEEvaluation
from lit_vlm.callbacks.predictions import PredictionWriter
from lit_vlm.callbacks.results import Checkpoint, ResultsWriter
from lit_vlm.callbacks.retrieval import RetrievalEvaluation
from lit_vlm.callbacks.training import NonFiniteLoss, NonFiniteLossError, RandomState
from lit_vlm.callbacks.vqa import VQAEvaluation
from lit_vlm.callbacks.zeroshot import ZeroShotEvaluation

__all__ = [
    "CaptionEvaluation",
    "Checkpoint",
    "CompositionalEvaluation",
    "DataStats",
    "EvalCallback",
    "FewShotEvaluation",
    "NonFiniteLoss",
    "NonFiniteLossError",
    "POPEEvaluation",
    "PredictionWriter",
    "RandomState",
    "ResultsWriter",
    "RetrievalEvaluation",
    "SamplesPerSecond",
    "VQAEvaluation",
    "ZeroShotEvaluation",
]
