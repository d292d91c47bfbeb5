"""Detection: MIMDet's partial-input detector on torchvision's Mask R-CNN (docs/detection.md).

One module each: ``backbone`` (ConvStem, partial-input ViT, MAE-started decoder, FPN; the pyramid backbone for
Pale), ``detector`` (the Mask R-CNN / Faster R-CNN assembly), ``data`` (COCO-format sets, the recipe's
augmentation, the data module), ``build_sets`` (the real small sets), ``evaluation`` (COCO box and mask AP) and
``pictures``. The training method is ``src/methods/detect.py`` (``objective=detect``), fitted by the same pipeline
as every other run.
"""
