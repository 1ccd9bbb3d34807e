import sys

from loadgen.main import main

sys.exit(main())
