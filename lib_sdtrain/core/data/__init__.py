"""Core — Training images: folder reading, captions and templates, the dataset and its batching, built-in samples."""
