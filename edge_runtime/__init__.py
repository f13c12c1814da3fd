"""minicpmv-edge reference runtime: models, checkpoints, preprocessing, generation, bundles."""

__version__ = "0.1.0"
