"""Code shared by the imgsearch services and the client: errors, images, logging, serving."""
