"""Mask2Former engine: train, evaluate, export, quantize and deploy universal segmentation models.

The package is importable without torch: the heavy parts (model, data loaders, actions) are imported
by the actions that need them, so Airflow can import the light modules (config, results, data-source
planning) at DAG-parse time.
"""

__version__ = "0.1.0"
