"""Core — Files: atomic writes, safe names, torch pickles read weights-only, embeddings in every format the host loads."""
