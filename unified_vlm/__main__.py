import sys

from unified_vlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
