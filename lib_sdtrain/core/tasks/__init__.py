"""Core — What sdtrain does, as job kinds: textual inversion, hypernetworks, preprocessing, and their registry."""
