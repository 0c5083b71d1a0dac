import sys

from kubetune_dev.cli import main

sys.exit(main())
