"""HA's own vocabulary beside the adaptors' types (app/adaptors/types.py): an instance's promotion rule."""

from __future__ import annotations

from typing import Literal

PromotionRule = Literal["prefer", "neutral", "must_not"]
