import sys

from xjfast.cli import main

sys.exit(main())
