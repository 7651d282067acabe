"""UI: the webui tabs (gradio), a thin surface over the job service. Arrives with the webui adapter."""
