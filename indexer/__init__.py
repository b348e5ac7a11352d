"""gradindex indexer: the gradient engine, projections, FAISS indexes and the SQLite catalog."""
