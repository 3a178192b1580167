import sys

from sem.cli import main

sys.exit(main())
