import os
import sys

# The sample tests import their helper from this folder.
sys.path.insert(0, os.path.dirname(__file__))
