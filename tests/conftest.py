import sys
from pathlib import Path

# The method files are scripts at the top of the repository, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
