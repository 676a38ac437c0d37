"""Model builders.

* :mod:`sparsediff.models.unet` — ``build_unet`` presets (LDM-4 274.06 M UNet, small, fmnist, tiny).
* :mod:`sparsediff.models.autoencoder` — VQ / KL first stages (``build_autoencoder``, losses,
  ``encode_latents`` / ``decode_latents``, ``load_autoencoder``, ``autoencoder_fingerprint``).
* :mod:`sparsediff.models.chirodiff` — ChiroDiff sequence model.

Submodules are imported explicitly (no eager heavy imports here).
"""
