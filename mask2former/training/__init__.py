"""Training: the LightningModule and DataModule, optimiser and schedules, callbacks (status lines,
checkpoints, best record), devices and multi-process launch. Used by :mod:`mask2former.actions.train`."""
