import sys

from tools.data.build import entry

sys.exit(entry())
