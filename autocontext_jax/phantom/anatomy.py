"""The phantom's anatomy as data: the tissue table, its classes and the reference body."""

from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from autocontext_jax.data.labels import PAPER_CLASS_NAMES

# The reference body (mm) that all anatomical coordinates of the painters are written for.
_REF_SEMI_AXES = (84.0, 72.0, 72.0)


class _Tissue(NamedTuple):
    """One tissue: its class (a name of PAPER_CLASS_NAMES) and its HU range."""

    name: str
    label: str
    hu: tuple[float, float]


# Tissue ids are indices into this table. Several tissues may share a class (stomach wall and
# lumen), many are unlabelled background that a network must learn to ignore (kidney cortex is as
# bright as the portal vein, hepatic veins are dark tubes inside the liver label).
_TISSUES: tuple[_Tissue, ...] = (
    _Tissue("air", "background", (-1000.0, -1000.0)),
    _Tissue("subcutaneous_fat", "background", (-110.0, -90.0)),
    _Tissue("muscle", "background", (40.0, 60.0)),
    _Tissue("visceral_fat", "background", (-100.0, -80.0)),
    _Tissue("lung", "background", (-880.0, -820.0)),
    _Tissue("cortical_bone", "background", (600.0, 800.0)),
    _Tissue("cancellous_bone", "background", (220.0, 320.0)),
    _Tissue("disc", "background", (70.0, 100.0)),
    _Tissue("csf", "background", (0.0, 15.0)),
    _Tissue("kidney_cortex", "background", (150.0, 200.0)),
    _Tissue("kidney_medulla", "background", (80.0, 120.0)),
    _Tissue("bowel_wall", "background", (40.0, 60.0)),
    _Tissue("bowel_fluid", "background", (0.0, 25.0)),
    _Tissue("bowel_air", "background", (-980.0, -900.0)),
    _Tissue("stool", "background", (-160.0, -40.0)),
    _Tissue("systemic_vein", "background", (60.0, 100.0)),
    _Tissue("liver", "liver", (100.0, 130.0)),
    _Tissue("hepatic_vein", "liver", (60.0, 90.0)),
    _Tissue("spleen", "spleen", (110.0, 140.0)),
    _Tissue("stomach_wall", "stomach", (40.0, 70.0)),
    _Tissue("stomach_fluid", "stomach", (0.0, 30.0)),
    _Tissue("stomach_air", "stomach", (-950.0, -880.0)),
    _Tissue("pancreas", "pancreas", (70.0, 100.0)),
    _Tissue("gallbladder", "gallbladder", (0.0, 25.0)),
    _Tissue("portal_vein", "portal_vein", (150.0, 220.0)),
    _Tissue("artery", "artery", (220.0, 300.0)),
)
_T = MappingProxyType({t.name: i for i, t in enumerate(_TISSUES)})  # tissue name -> id
_BONE = (_T["cortical_bone"], _T["cancellous_bone"], _T["disc"], _T["csf"])


def _tissue_labels() -> np.ndarray:
    """Lookup table tissue id -> class id."""
    return np.array([PAPER_CLASS_NAMES.index(t.label) for t in _TISSUES], dtype=np.uint8)
