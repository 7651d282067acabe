"""Webui preload hook: sdtrain's command-line flags, added to the webui's parser before it parses."""


def preload(parser):
    parser.add_argument(
        "--sdtrain-no-api",
        action="store_true",
        help="sdtrain: do not add sdtrain's HTTP routes",
        default=False,
    )
