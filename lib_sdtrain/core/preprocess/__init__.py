"""Core — Preprocessing: a folder of raw pictures into a training folder (crops, splits, flips, captions)."""
