"""Host(A1111): the port over a running AUTOMATIC1111 v1.10.x webui (only this package imports `modules`)."""
