"""Synthetic visual-reasoning data for CPT stage 2: procedural scenes, task generators, metrics."""

from .metrics import (
    box_iou,
    choice_accuracy,
    counting_accuracy,
    detection_score,
    label_accuracy,
    parse_box,
    parse_choice,
    parse_count,
    parse_label,
    parse_presence,
)
from .shapes import CATEGORIES, COLORS, ImageFolderSource, ObjectAnnotation, render_grid_scene, render_scene
from .tasks import (
    DEFAULT_TASKS,
    TASKS,
    ColorTask,
    CountingTask,
    DetectionTask,
    MatchingTask,
    ReconstructionTask,
    ShapeTask,
    TaskMixture,
)

__all__ = [
    "CATEGORIES",
    "COLORS",
    "DEFAULT_TASKS",
    "TASKS",
    "ColorTask",
    "CountingTask",
    "DetectionTask",
    "ImageFolderSource",
    "MatchingTask",
    "ObjectAnnotation",
    "ReconstructionTask",
    "ShapeTask",
    "TaskMixture",
    "box_iou",
    "choice_accuracy",
    "counting_accuracy",
    "detection_score",
    "label_accuracy",
    "parse_box",
    "parse_choice",
    "parse_count",
    "parse_label",
    "parse_presence",
    "render_grid_scene",
    "render_scene",
]
