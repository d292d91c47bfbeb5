"""Self-supervised pretraining toolkit for vision transformers (MAE, BEiT, DeiT over ViT and Pale)."""
