"""Data pipelines: every backend turns images on disk into a `ViewBatch` of augmented views on device."""
