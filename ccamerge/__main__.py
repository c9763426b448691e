import sys

from ccamerge.cli import main

sys.exit(main())
