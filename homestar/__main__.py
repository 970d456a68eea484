import sys

from homestar.cli import main

sys.exit(main())
