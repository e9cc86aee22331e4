"""Looking inside a pre-trained encoder: layer similarity (CKA), [CLS] attention maps, and the PNGs of
views, training curves, CKA and attention that `tools/analyze.py` writes."""
