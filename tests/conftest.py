import sys
from pathlib import Path

# test helpers (tiny oracle models) are imported by name from this folder
sys.path.insert(0, str(Path(__file__).parent))
