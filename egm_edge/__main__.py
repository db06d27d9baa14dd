import sys

from egm_edge.cli import main

sys.exit(main())
