import sys

from sonomaly.tools.cli import main

sys.exit(main())
