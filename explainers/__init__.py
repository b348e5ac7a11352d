"""gradindex explainers: GradientSimilarity, Anchors and BiLRP."""
