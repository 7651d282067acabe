"""Core: host-free training code (stdlib, torch, numpy, PIL, safetensors only)."""
