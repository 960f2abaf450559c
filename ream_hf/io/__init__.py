"""Checkpoint I/O, apart from the math: the source (local folder, Hub download, index), the one safetensors
reader, the writer (size-capped parts, shards and index, atomic output folder) and our own verification of a
written checkpoint."""
