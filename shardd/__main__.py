import sys

from shardd.main import main

sys.exit(main())
