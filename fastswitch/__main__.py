import sys

from fastswitch.cli import main

sys.exit(main())
