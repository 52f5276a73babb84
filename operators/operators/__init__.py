"""The operators, one per engine action, plus AutoML."""
