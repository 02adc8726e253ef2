"""mixedae_fast: MixedAE (Mixed Autoencoder, CVPR 2023) pretraining for Vision Transformers."""

__version__ = "0.1.0"
