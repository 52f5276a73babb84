"""Hooks of the Mask2Former operators (every outside call of the Airflow side)."""
