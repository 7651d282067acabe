"""Host(standalone): the TrainingHost port over a bare ldm model (SD1/SD2), for the CLI and the tests.

Modules: `host` (StandaloneHost), `loader` (real checkpoints + yaml, offline), `tiny` (tiny random models built
A1111's way), `tokenizer` (CLIP tokenizer files generated from open_clip's vocabulary).
"""

import warnings


def silence_legacy_warnings() -> None:
    """ldm (2022) imports pytorch_lightning 1.9 APIs that warn at every start; the warnings say
    nothing about sdtrain and would bury the demo's output. pytorch_lightning installs its own
    "default" filters when imported, so it is imported first and ours go in front of them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pytorch_lightning  # noqa: F401
        except ImportError:
            return
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    warnings.filterwarnings("ignore", message=r".*rank_zero_only.* has been deprecated")
