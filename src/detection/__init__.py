"""Detection: the room for the MIMDet partial-input detector on torchvision's Mask R-CNN.

Planned contents (one module each): the ConvStem, the partial-input ViT backbone and its decoder, the FPN
assembly, the COCO-format data and the COCO evaluation. It will be one more training method in
``src/methods`` (``task=detect``), fitted by the same pipeline as every other run. Nothing is here yet.
"""
