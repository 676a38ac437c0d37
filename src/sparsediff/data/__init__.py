"""Datasets.

* :mod:`sparsediff.data.images` — image folders (CelebA-HQ, LSUN-Bedrooms, Imagenette) and the
  built-in Fashion-MNIST, as float tensors in [-1, 1]; ``build_image_dataset`` factory.
* :mod:`sparsediff.data.latents` — ``LatentCache`` / ``LatentDataset``: first-stage latents
  encoded once and cached as safetensors.
* stroke / raster modules — ChiroDiff sketch data.

Submodules are imported explicitly (no eager heavy imports here).
"""
