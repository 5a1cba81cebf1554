"""The paper's numbers (mIoU %), transcribed from paper-dssn-mm23.md, keyed like our runs.

Key: (protocol, split, backbone, variant). `supervised` = the paper's "Baseline" row.
Numbers only drawn in a figure (Fig. 3, Fig. 4, Fig. 5) are not given in the text: None.
Table 5's text and its table disagree on which single term gives which number; the text
(low-level alone +0.57 -> 78.90, high-level alone +0.86 -> 79.19) is used, low = image level.
"""

from __future__ import annotations

_T1 = {
    "92": (44.10, 75.24),
    "183": (52.30, 76.75),
    "366": (61.80, 78.68),
    "732": (66.70, 80.61),
    "1464": (72.90, 81.18),
}
_T2 = {
    "resnet50": {"1_16": (61.20, 76.74), "1_8": (67.30, 77.81), "1_4": (70.80, 78.27), "1_2": (74.75, 78.32)},
    "resnet101": {"1_16": (65.6, 78.50), "1_8": (70.40, 79.58), "1_4": (72.80, 79.45), "1_2": (76.65, 79.96)},
}
_T3 = {
    "resnet50": {"1_16": (63.30, 75.41), "1_8": (70.20, 77.31), "1_4": (73.10, 78.05), "1_2": (76.60, 78.73)},
    "resnet101": {
        "1_16": (66.30, 76.52),
        "1_8": (72.80, 78.18),
        "1_4": (75.00, 78.62),
        "1_2": (78.00, 79.58),
    },
}
_UNIMATCH_T1 = {"92": 75.20, "183": 77.20, "366": 78.80, "732": 79.90, "1464": 81.20}

PAPER: dict[str, dict[tuple[str, str, str, str], float | None]] = {
    "table1": {
        **{("classic", s, "resnet101", "supervised"): b for s, (b, _) in _T1.items()},
        **{("classic", s, "resnet101", "dssn"): d for s, (_, d) in _T1.items()},
        **{("classic", s, "resnet101", "unimatch"): u for s, u in _UNIMATCH_T1.items()},
    },
    "table2": {
        **{("blended", s, bb, "supervised"): b for bb, t in _T2.items() for s, (b, _) in t.items()},
        **{("blended", s, bb, "dssn"): d for bb, t in _T2.items() for s, (_, d) in t.items()},
    },
    "table3": {
        **{("cityscapes", s, bb, "supervised"): b for bb, t in _T3.items() for s, (b, _) in t.items()},
        **{("cityscapes", s, bb, "dssn"): d for bb, t in _T3.items() for s, (_, d) in t.items()},
    },
    "table4": {
        ("blended", "1_8", "resnet101", "t4_plain"): 76.12,
        ("blended", "1_8", "resnet101", "t4_contrastive"): 78.33,
        ("blended", "1_8", "resnet101", "t4_cplg"): 78.70,
        ("blended", "1_8", "resnet101", "dssn"): 79.58,
    },
    "table5": {
        ("blended", "1_8", "resnet101", "t5_none"): 78.33,
        ("blended", "1_8", "resnet101", "t5_low"): 78.90,
        ("blended", "1_8", "resnet101", "t5_high"): 79.19,
        ("blended", "1_8", "resnet101", "dssn"): 79.58,
    },
    "fig3": {
        ("cityscapes", "1_30", "resnet50", "dssn"): None,
        ("cityscapes", "1_30", "resnet50", "supervised"): None,
    },
    "fig4": {
        ("blended", "1_8", "resnet101", "f4_fixed092"): None,
        ("blended", "1_8", "resnet101", "f4_fixed096"): None,
        ("blended", "1_8", "resnet101", "dssn"): 79.58,
    },
}
