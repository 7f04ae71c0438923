import sys

from tokenspeed.cli import main

sys.exit(main())
