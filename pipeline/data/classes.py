"""Class names per dataset kind (for per-class metrics and plots)."""

from __future__ import annotations

from pipeline.data.synthetic import CLASSES as SYNTHETIC

VOC = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
              "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
              "bicycle"]


def class_names(kind: str, num_classes: int) -> list[str]:
    names = {"synthetic": SYNTHETIC, "voc": VOC, "cityscapes": CITYSCAPES}.get(kind)
    if names is None or len(names) != num_classes:
        return [f"class_{i}" for i in range(num_classes)]
    return list(names)
