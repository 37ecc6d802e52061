"""The index service: a faiss index of image embeddings over a durable SQLite store."""
