"""Synthetic visual-reasoning data for CPT stage 2: procedural scenes, task generators, metrics."""

from .metrics import (
    box_iou,
    choice_accuracy,
    counting_accuracy,
    detection_score,
    parse_box,
    parse_choice,
    parse_count,
    parse_presence,
)
from .shapes import CATEGORIES, COLORS, ImageFolderSource, ObjectAnnotation, render_scene
from .tasks import TASKS, CountingTask, DetectionTask, MatchingTask, ReconstructionTask, TaskMixture

__all__ = [
    "CATEGORIES",
    "COLORS",
    "TASKS",
    "CountingTask",
    "DetectionTask",
    "ImageFolderSource",
    "MatchingTask",
    "ObjectAnnotation",
    "ReconstructionTask",
    "TaskMixture",
    "box_iou",
    "choice_accuracy",
    "counting_accuracy",
    "detection_score",
    "parse_box",
    "parse_choice",
    "parse_count",
    "parse_presence",
    "render_scene",
]
