"""API: HTTP routes (FastAPI) over the job service. Arrives with the webui adapter."""
