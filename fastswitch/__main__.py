import sys

from fastswitch.cli import main

if __name__ == "__main__":  # not when a spawned engine-core process imports it
    sys.exit(main())
