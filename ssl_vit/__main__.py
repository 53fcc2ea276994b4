"""`python -m ssl_vit <command>` (also under `accelerate launch -m ssl_vit <command>`)."""

import sys

from ssl_vit.cli.main import main

sys.exit(main())
