"""Extra links of the Mask2Former operators."""
