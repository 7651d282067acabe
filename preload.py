"""Webui preload hook: sdtrain's command-line flags, added to the webui's parser before it parses."""


def preload(parser):
    parser.add_argument(
        "--sdtrain-no-api",
        action="store_true",
        help="sdtrain: do not add sdtrain's HTTP routes",
        default=False,
    )

    # Webuis that removed hypernetworks (Forge Classic) have no --hypernetwork-dir and refuse the flag:
    # sdtrain adds it there (its help marks it as sdtrain's, for the host probe), with A1111's default.
    if "--hypernetwork-dir" not in getattr(parser, "_option_string_actions", {"--hypernetwork-dir": None}):
        import os

        try:
            from modules.paths_internal import models_path
        except ImportError:  # a webui without A1111's paths module: the working directory's models/
            models_path = os.path.join(os.getcwd(), "models")
        parser.add_argument(
            "--hypernetwork-dir",
            type=str,
            default=os.path.join(models_path, "hypernetworks"),
            help="sdtrain: hypernetwork directory (the webui has none of its own)",
        )
