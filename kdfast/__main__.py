import sys

from kdfast.cli import main

sys.exit(main())
