"""Webui entry point: sdtrain's composition root (the only file in scripts/).

The webui runs this file with the extension folder on sys.path. It wires the webui host adapter
to the job service, UI and API. That adapter (lib_sdtrain/hosts/a1111) is not written yet, so
for now this registers nothing: the extension loads cleanly and changes nothing in the webui.
The standalone trainer works today: see README.md (python -m lib_sdtrain).
"""

import logging

import lib_sdtrain

logging.getLogger("lib_sdtrain").debug("sdtrain %s loaded; webui integration pending", lib_sdtrain.__version__)
