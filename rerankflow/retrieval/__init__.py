"""First-stage retrieval: embedders with a safe cache, FAISS search, the candidates rerankers reorder."""
