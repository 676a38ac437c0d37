"""Datasets.

* :mod:`sparsediff.data.images` — image folders (CelebA-HQ, LSUN-Bedrooms, Imagenette) and the
  built-in Fashion-MNIST, as float tensors in [-1, 1]; ``build_image_dataset`` factory.
* :mod:`sparsediff.data.latents` — ``LatentCache`` / ``LatentDataset``: latents encoded once by
  a caller-supplied ``encode`` function and cached as safetensors.
* :mod:`sparsediff.data.idx` — the IDX ((Fashion-)MNIST) reader; :mod:`sparsediff.data.splits` —
  the seeded random split shared by the datasets.
* stroke / raster modules — ChiroDiff sketch data.

Data knows no network: this package imports nothing from the model, pipeline or training packages.
Submodules are imported explicitly (no eager heavy imports here).
"""
