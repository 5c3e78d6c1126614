import sys

from examples.elevra_upload.cli import main

sys.exit(main())
