"""Data pipelines: loaders that yield normalised image batches on the training device."""
