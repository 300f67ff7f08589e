import sys

from hiddenpool.cli import main

sys.exit(main())
