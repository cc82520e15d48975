import sys

from vitas.cli import main

sys.exit(main())
