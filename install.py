"""Webui install hook (run by the webui at start-up in its own Python).

sdtrain needs only packages every AUTOMATIC1111-compatible webui already ships (torch, numpy,
Pillow, safetensors, gradio, fastapi), so it installs nothing.
"""
