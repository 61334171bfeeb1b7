import sys

from jreason.cli import main

sys.exit(main())
