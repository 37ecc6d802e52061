"""The peer side of the performance benchmark: other vector search products, each run in its own venv."""
