import sys

from lit_vlm.cli import main

sys.exit(main())
