"""Core — The hypernetwork module as the host defines it (and its .pt/.optim files), and a generic attach by hooks."""
