"""Triggers of the Mask2Former operators."""
