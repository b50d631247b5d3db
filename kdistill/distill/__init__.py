"""Distillation: teacher signals (live or cached), feature taps and the Distiller."""

from kdistill.distill.distiller import Distiller
from kdistill.distill.signals import (
    CachedTeacher,
    LiveTeacher,
    TeacherOutput,
    TopKLogits,
    cached_teacher_logits,
    check_cache_dir,
    freeze,
    soft_label_key,
    teacher_logits,
)
from kdistill.distill.taps import FeatureTaps

__all__ = [
    "CachedTeacher", "Distiller", "FeatureTaps", "LiveTeacher", "TeacherOutput", "TopKLogits",
    "cached_teacher_logits", "check_cache_dir", "freeze", "soft_label_key", "teacher_logits",
]
