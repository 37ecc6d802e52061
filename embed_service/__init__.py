"""The embed service: a gRPC server that turns images into L2-normalised CLIP embeddings."""
