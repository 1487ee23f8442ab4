"""The inspection domain as configuration: which class is the good part, which classes a mirror
turns into each other. Generic code asks a `Domain`; `INSPECTION` holds the classes of vitray's
inspection data (a part `passed`, or shifted out of its seat in +x, -x, +y or -y).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    """The classes of one inspection task and what is known about them."""

    # The class a part is shipped as: its images need no map under `--attention defects`, evaluation
    # measures map localisation on the others, and an anomaly bank learns from it.
    ok_class: str = "passed"
    # Every class is a displacement of a given size along an axis: a flip maps one onto its mirror
    # class (the pairs below, the rest onto themselves), a zoom or a turn would change what it shows.
    classes: tuple[str, ...] = ("passed", "Xplus", "Xminus", "Yplus", "Yminus")
    # Mirror pairs: a horizontal flip turns a part shifted in +x into one shifted in -x; the other
    # axis and `passed` are unchanged.
    hflip_pairs: tuple[tuple[str, str], ...] = (("Xplus", "Xminus"),)
    vflip_pairs: tuple[tuple[str, str], ...] = (("Yplus", "Yminus"),)

    def mirror(self, pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
        """Each class of `pairs` to its mirror image, both ways round."""
        return {**dict(pairs), **{b: a for a, b in pairs}}


INSPECTION = Domain()
OK_CLASS = INSPECTION.ok_class
