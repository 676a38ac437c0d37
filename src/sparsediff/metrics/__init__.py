"""Evaluation metrics: offline FID Inception features, FID/KID/precision-recall, stats cache.

See docs/evaluation.md for the protocol.
"""

from .checks import as_uint8_images
from .features import extract_features
from .image_metrics import (
    compute_metrics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    precision_recall,
)
from .inception import (
    DEFAULT_INCEPTION_SHA1,
    INCEPTION_ENV_VAR,
    PREPROCESSING_VERSION,
    InceptionFeatures,
    feature_network_hash,
    find_inception_weights,
    tf1_bilinear_resize,
)
from .reference import ReferenceCache, canonical_key_json, key_digest, reference_key

__all__ = [
    "DEFAULT_INCEPTION_SHA1",
    "INCEPTION_ENV_VAR",
    "PREPROCESSING_VERSION",
    "InceptionFeatures",
    "ReferenceCache",
    "as_uint8_images",
    "canonical_key_json",
    "compute_metrics",
    "extract_features",
    "feature_network_hash",
    "feature_statistics",
    "fid_from_features",
    "find_inception_weights",
    "frechet_distance",
    "key_digest",
    "kid_from_features",
    "precision_recall",
    "reference_key",
    "tf1_bilinear_resize",
]
